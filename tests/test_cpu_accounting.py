"""The benchmarks' CPU accounting: a process's CPU time lands under the part its title names, and a
process this one did not start is "other"."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.cpu_accounting import CpuAccounting

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"


def _running(pid: str) -> bool:
    """Alive and not a zombie (an init that does not reap would keep it listed)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CpuAccounting reads /proc, which only Linux has")
def test_cpu_time_is_counted_under_the_part_its_process_title_names():
    with CpuAccounting(interval=0.1) as cpu:
        # A child of this process, titled like an encoder actor, and one detached from it (its
        # parent exits at once, so it is re-parented outside this process's tree).
        subprocess.run([sys.executable, "-c", BURN, "ray::MapWorker(MapBatches(Encode))"], check=True)
        detached = subprocess.run(
            ["sh", "-c", f'"{sys.executable}" -c "$0" ray::IDLE & echo $!', BURN], check=True, capture_output=True, text=True
        ).stdout.strip()
        deadline = time.monotonic() + 30
        while _running(detached) and time.monotonic() < deadline:
            time.sleep(0.05)
    parts = cpu.report()["core_seconds"]
    assert 0.4 <= parts["encoder_actors"] <= 0.8, parts
    assert "read_decode_tasks" not in parts, parts  # the detached one is not this run's
    assert parts["other"] >= 0.4, parts
