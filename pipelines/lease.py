"""A lease in the run's storage (local or S3) that lets one run of a workflow go at a time.

The holder writes `lease.json` (owner, host, pid, start) and refreshes its heartbeat from a
background thread. Another run that finds a fresh heartbeat refuses to start; a lease whose
heartbeat is older than `stale_after_s` belongs to a run that died (killed, node lost) and is taken
over. Two runs that start at the same moment both write, wait `settle_s`, and read back: S3 and
local files are read-after-write consistent, so both see the same last writer, and only it goes on.
"""

import json
import os
import socket
import threading
import time
import uuid

from data_prep.cache import join, read_text, resolve, write_text_atomically

LEASE = "lease.json"


class LeaseHeldError(RuntimeError):
    """Another run holds the lease."""


class Lease:
    def __init__(self, url: str, stale_after_s: float = 300.0, heartbeat_s: float = 30.0, settle_s: float = 2.0):
        if heartbeat_s * 2 > stale_after_s:
            raise ValueError(f"the heartbeat ({heartbeat_s} s) must be well under stale_after_s ({stale_after_s} s)")
        self.url = url
        self.fs, root = resolve(url)
        self.path = join(root, LEASE)
        self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
        self.owner = uuid.uuid4().hex
        self.record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._stop = threading.Event()
        self._thread = None

    def _read(self) -> dict | None:
        text = read_text(self.fs, self.path)
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None  # a torn or foreign file: treat as no lease

    def _write(self) -> None:
        write_text_atomically(self.fs, self.path, json.dumps({**self.record, "heartbeat": time.time()}) + "\n")

    def acquire(self) -> "Lease":
        current = self._read()
        if current is not None and current.get("owner") != self.owner:
            age = time.time() - float(current.get("heartbeat", 0))
            if age < self.stale_after_s:
                raise LeaseHeldError(
                    f"another run holds {join(self.url, LEASE)}: started {current.get('started')} on "
                    f"{current.get('host')} (pid {current.get('pid')}), heartbeat {age:.0f} s ago. It is still running; "
                    f"if it died, its lease expires {self.stale_after_s - age:.0f} s from now."
                )
        self._write()
        time.sleep(self.settle_s)
        current = self._read()
        if current is None or current.get("owner") != self.owner:
            raise LeaseHeldError(f"another run took {join(self.url, LEASE)} at the same moment (started {current and current.get('started')})")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read()
            if current is not None and current.get("owner") != self.owner:
                return  # taken over (we were presumed dead): stop writing
            try:
                self._write()
            except OSError:
                pass  # storage briefly away: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        current = self._read()
        if current is not None and current.get("owner") == self.owner:
            self.fs.delete_file(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
