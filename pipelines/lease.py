"""A lease in the run's storage (local or S3) that lets one run of a workflow go at a time.

The holder writes `lease.json` (owner, host, pid, start, heartbeat) and refreshes its heartbeat from a
background thread. Another run that finds a fresh heartbeat refuses to start; a lease whose heartbeat
is older than `stale_after_s` belongs to a run that died (killed, node lost) and is taken over.

Every change is a compare-and-swap, so two runs never both believe they hold it:
- acquire creates `lease.json` only if there is none (S3: `PutObject` with `If-None-Match: *`;
  locally: a hard link, which fails if the name exists), and takes over a stale one only if it is
  still the very lease it judged stale (S3: `If-Match: <its ETag>`; locally: compared under a lock);
- a heartbeat rewrites it only if it is still the one this run last wrote, and release deletes it on
  the same condition.
A heartbeat that fails for any reason (after the S3 client's own retries), or finds the lease no longer
ours, marks it lost: `check()` then raises LeaseLostError, and the workflow calls it before each
phase, so a run that lost its lease stops before doing anything more.

Locally, the read-compare-write steps run under `fcntl.flock` on `lease.json.lock`, which the kernel
releases when its holder dies (no stale lock to clean up). This holds between processes of one machine,
or of machines sharing a filesystem whose locks work across them; to keep runs on separate machines
apart, put the state on S3.
"""

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from core.storage import join, resolve

log = logging.getLogger(__name__)

LEASE = "lease.json"


class LeaseHeldError(RuntimeError):
    """Another run holds the lease."""


class LeaseLostError(RuntimeError):
    """This run held the lease and no longer does (taken over, or its heartbeat failed)."""


@dataclasses.dataclass
class _Version:
    text: str
    token: str  # what a conditional write compares: S3's ETag; locally the text itself


class _S3Store:
    """`lease.json` as one S3 object, changed with conditional requests (S3 makes each atomic)."""

    def __init__(self, path: str):
        import boto3  # AWS settings from the standard environment, as for pyarrow's S3FileSystem

        self.bucket, _, self.key = path.partition("/")
        self.client = boto3.client("s3")

    def _refused(self, err: Exception) -> bool:
        """The condition did not hold: the object changed (412), a concurrent conditional write won
        (409), or it is gone (an If-Match on a missing key is a 404)."""
        from botocore.exceptions import ClientError

        return isinstance(err, ClientError) and err.response["Error"]["Code"] in (
            "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey")

    def read(self) -> _Version | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return _Version(got["Body"].read().decode(), got["ETag"])

    def _put(self, text: str, **condition) -> str | None:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode(), **condition)["ETag"]
        except Exception as err:
            if self._refused(err):
                return None
            raise

    def create(self, text: str) -> str | None:
        return self._put(text, IfNoneMatch="*")

    def replace(self, text: str, token: str) -> str | None:
        return self._put(text, IfMatch=token)

    def delete(self, token: str) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
            return True
        except Exception as err:
            if self._refused(err):
                return False
            raise


class _LocalStore:
    """`lease.json` as a local file. A hard link creates it only if absent (like O_CREAT|O_EXCL, but the
    file appears with its whole content); a replace or delete compares and writes under an exclusive
    `flock` on a separate lock file, which every change takes, so no one changes the file in between."""

    def __init__(self, path: str):
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> _Version | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return _Version(text, text)

    def _staged(self, text: str) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, text: str) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            tmp = self._staged(text)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        return text

    def replace(self, text: str, token: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current.token != token:
                return None
            os.replace(self._staged(text), self.path)
        return text

    def delete(self, token: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current.token != token:
                return False
            self.path.unlink()
        return True


class Lease:
    def __init__(self, url: str, stale_after_s: float = 300.0, heartbeat_s: float = 30.0):
        if heartbeat_s * 2 > stale_after_s:
            raise ValueError(f"the heartbeat ({heartbeat_s} s) must be well under stale_after_s ({stale_after_s} s)")
        self.url = join(url, LEASE)
        _, root = resolve(url)
        self.store = _S3Store(join(root, LEASE)) if url.startswith("s3://") else _LocalStore(join(root, LEASE))
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.owner = uuid.uuid4().hex
        self.record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.lost: str | None = None  # why this run no longer holds the lease
        self._token: str | None = None  # the version this run last wrote
        self._refreshed = 0.0  # time.monotonic() of the last heartbeat that was written
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def _text(self) -> str:
        return json.dumps({**self.record, "heartbeat": time.time()}) + "\n"

    @staticmethod
    def _parse(version: _Version | None) -> dict | None:
        try:
            record = json.loads(version.text) if version is not None else None
        except ValueError:
            return None  # a torn or foreign file: no owner, taken over like a stale one
        return record if isinstance(record, dict) else None

    @staticmethod
    def _describe(record: dict) -> str:
        return (f"started {record.get('started')} on {record.get('host')} "
                f"(pid {record.get('pid')}, owner {record.get('owner')})")

    def acquire(self) -> "Lease":
        for _ in range(3):  # the lease may be released or replaced between two of our steps: look again
            token = self.store.create(self._text())
            if token is not None:
                return self._hold(token)
            current = self.store.read()
            if current is None:
                continue  # released since
            record = self._parse(current) or {}
            age = time.time() - float(record.get("heartbeat", 0))
            if age < self.stale_after_s:
                raise LeaseHeldError(
                    f"refused: another run holds {self.url}: {self._describe(record)}, heartbeat {age:.0f} s ago. It is "
                    f"still running; if it died, its lease expires {self.stale_after_s - age:.0f} s from now."
                )
            token = self.store.replace(self._text(), current.token)
            if token is None:
                raise LeaseHeldError(f"refused: another run took over the stale lease {self.url} at the same moment")
            log.warning("took over the stale lease %s: %s, heartbeat %.0f s ago (more than stale_after_s %s s)",
                        self.url, self._describe(record), age, self.stale_after_s)
            return self._hold(token)
        raise LeaseHeldError(f"refused: {self.url} changed under every attempt to take it: other runs are starting; try later")

    def _hold(self, token: str) -> "Lease":
        self._token, self._refreshed = token, time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _lose(self, reason: str) -> None:
        with self._state:
            if self.lost is None:
                self.lost = reason
                log.error("lost the lease %s: %s", self.url, reason)

    def _beat(self) -> None:
        while self.lost is None and not self._stop.wait(self.heartbeat_s):
            try:
                self._refresh()
            except Exception as err:  # noqa: BLE001 (whatever it is, we can no longer vouch the lease is ours)
                self._lose(f"its heartbeat failed: {type(err).__name__}: {err}")

    def _refresh(self) -> None:
        token = self.store.replace(self._text(), self._token)
        if token is not None:
            self._token, self._refreshed = token, time.monotonic()
            return
        current = self.store.read()
        record = self._parse(current)
        if record is not None and record.get("owner") == self.owner:
            self._token = current.token  # our own write landed but its answer was lost (S3 retried it)
            return
        self._lose("it is gone" if current is None else f"another run took it over: {self._describe(record or {})}")

    def check(self, phase: str) -> None:
        """Raises LeaseLostError unless this run still holds the lease; called before each `phase`."""
        if self.lost is None:
            silent = time.monotonic() - self._refreshed
            if silent > self.stale_after_s:
                self._lose(f"no heartbeat was written for {silent:.0f} s (stale_after_s is {self.stale_after_s} s), "
                           f"so another run may have taken it over")
        if self.lost is None:
            try:
                record = self._parse(self.store.read())
            except Exception as err:  # noqa: BLE001 (as in the heartbeat: unknown means not ours)
                self._lose(f"reading it failed: {type(err).__name__}: {err}")
            else:
                if record is None or record.get("owner") != self.owner:
                    self._lose("it is gone" if record is None
                               else f"another run took it over: {self._describe(record)}")
        if self.lost is not None:
            raise LeaseLostError(
                f"stopped before {phase}: this run no longer holds the lease {self.url}: {self.lost}. Another run may "
                f"be working on the same state, so this one does nothing more; rerun the same command when no run "
                f"holds the lease, and it finishes the attempt."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 60)
        if self.lost is not None or self._token is None:
            return  # not ours (any more): leave it to its holder
        try:
            if not self.store.delete(self._token):
                log.warning("did not delete %s: it changed since this run's last heartbeat", self.url)
        except Exception as err:  # noqa: BLE001 (the lease then expires after stale_after_s)
            log.warning("could not delete %s (%s: %s); it expires %s s after the last heartbeat",
                        self.url, type(err).__name__, err, self.stale_after_s)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
