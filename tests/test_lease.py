"""The storage lease that lets one retraining run go at a time (local files and moto's S3)."""

import threading
import time

import pytest
from conftest import make_bucket

from pipelines.lease import Lease, LeaseHeldError


@pytest.mark.parametrize("where", ["local", "s3"])
def test_one_holder_at_a_time_and_a_dead_holder_expires(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_server")
        url = f"s3://{make_bucket('lease-tests')}/state"
    else:
        url = str(tmp_path / "state")
    first = Lease(url, stale_after_s=3, heartbeat_s=0.5, settle_s=0.2).acquire()
    time.sleep(3.5)  # longer than stale_after_s: the heartbeat keeps it fresh
    with pytest.raises(LeaseHeldError, match="another run holds"):
        Lease(url, stale_after_s=3, heartbeat_s=0.5, settle_s=0.2).acquire()
    first.release()
    with Lease(url, stale_after_s=3, heartbeat_s=0.5, settle_s=0.2):
        pass  # released: free again

    dead = Lease(url, stale_after_s=2, heartbeat_s=0.5, settle_s=0.2).acquire()
    dead._stop.set()  # the holder dies without releasing: no more heartbeats
    time.sleep(2.5)
    with Lease(url, stale_after_s=2, heartbeat_s=0.5, settle_s=0.2) as taker:
        assert taker._read()["owner"] == taker.owner


def test_two_runs_starting_at_the_same_moment_one_goes(tmp_path):
    url = str(tmp_path / "state")
    outcomes, barrier = [], threading.Barrier(2)

    def start():
        lease = Lease(url, stale_after_s=10, heartbeat_s=1, settle_s=0.5)
        barrier.wait()
        try:
            lease.acquire()
            outcomes.append("held")
            time.sleep(1.5)
            lease.release()
        except LeaseHeldError:
            outcomes.append("refused")

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held", "refused"]
