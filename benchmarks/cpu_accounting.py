"""Where a local run's CPU time goes, per kind of process (Linux /proc, no extra package).

    with CpuAccounting() as cpu:
        run_prep(cfg)
    cpu.report()  # core-seconds per part, the machine's idle time, and the wall time

Every process is sampled every `interval` seconds and keeps the CPU time of its last sample, so a
process that ends during the run (an encoder actor is killed when the dataset finishes) loses at
most its last interval. Only this process and its descendants (the local Ray cluster it started:
GCS, raylet, workers) are parted out; any other process on the machine is "other". A Ray worker
changes its title with the work it runs; it is counted under the most specific part it was ever
seen in (an actor's class beats a task's name).
"""

import os
import threading
import time
from pathlib import Path
from typing import Self

_TICKS = os.sysconf("SC_CLK_TCK")

# (part, title fragment), the first match wins; Ray workers name themselves "ray::<work>".
_PARTS = (
    ("encoder_actors", "Encode"),
    ("dedup_actor", "Deduplicate"),
    ("clip_score_actor", "ClipScoreFilter"),
    ("read_decode_tasks", "read_shard"),
    ("read_decode_tasks", "decode_and_filter"),
    ("read_decode_tasks", "ray::IDLE"),
)
_RANK = [part for part, _ in _PARTS] + ["driver", "ray_system", "other"]  # most specific first


def _stat(pid: str) -> tuple[str, float] | None:
    """(parent pid, CPU seconds) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[1], (int(fields[11]) + int(fields[12])) / _TICKS  # ppid, utime + stime


def _title(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _machine_idle_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / _TICKS  # idle, iowait


class CpuAccounting:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.me = str(os.getpid())
        self.start: dict[str, float] = {}  # pid -> CPU seconds when first seen
        self.last: dict[str, float] = {}
        self.parts: dict[str, str] = {}  # pid -> the most specific part seen
        self._stop = threading.Event()

    def _part(self, pid: str, parents: dict[str, str]) -> str:
        if pid == self.me:
            return "driver"
        ancestor = parents.get(pid)
        while ancestor not in (None, "0", self.me):
            ancestor = parents.get(ancestor)
        if ancestor != self.me:
            return "other"  # not started by this process: not this run's cluster (its title is not read)
        title = _title(pid)
        for part, fragment in _PARTS:
            if fragment in title:
                return part
        return "ray_system"

    def _sample(self, first: bool = False) -> None:
        stats = {pid: stat for pid in os.listdir("/proc") if pid.isdigit() and (stat := _stat(pid)) is not None}
        parents = {pid: parent for pid, (parent, _) in stats.items()}
        for entry, (_, seconds) in stats.items():
            part = self._part(entry, parents)
            known = self.parts.get(entry)
            if known is None or _RANK.index(part) < _RANK.index(known):
                self.parts[entry] = part
            self.start.setdefault(entry, seconds if first else 0.0)  # a process born during the run counts whole
            self.last[entry] = seconds

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._sample(first=True)
        self.idle0, self.t0 = _machine_idle_seconds(), time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0
        self.idle = _machine_idle_seconds() - self.idle0

    def report(self) -> dict:
        """Core-seconds per part over the run, the machine's idle core-seconds, and its total (wall x
        cores): the parts, idle included, add up to the total up to sampling and other machines' noise."""
        parts: dict[str, float] = {}
        for pid, part in self.parts.items():
            parts[part] = parts.get(part, 0.0) + self.last[pid] - self.start[pid]
        cores = os.cpu_count()
        return {"core_seconds": {k: round(v, 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
                "idle_core_seconds": round(self.idle, 2), "wall_seconds": round(self.wall, 2),
                "machine_core_seconds": round(self.wall * cores, 2)}
