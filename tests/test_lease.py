"""The storage lease that lets one retraining run go at a time (local files and moto's S3)."""

import json
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import make_bucket

from pipelines.lease import LEASE, Lease, LeaseHeldError, LeaseLostError


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def state(request, tmp_path):
    """A fresh state URL, and a reader and a writer of `<url>/lease.json` (or of another URL's) that go
    around the Lease, as another run or a person would."""
    if request.param == "local":
        url = str(tmp_path / "state")

        def read(where: str = url) -> dict | None:
            path = Path(where) / LEASE
            return json.loads(path.read_text()) if path.exists() else None

        def write(record: dict, where: str = url) -> None:
            Path(where).mkdir(parents=True, exist_ok=True)
            (Path(where) / LEASE).write_text(json.dumps(record))

        return url, read, write
    request.getfixturevalue("s3_server")
    import boto3

    client = boto3.client("s3")
    url = f"s3://{make_bucket(f'lease-{uuid.uuid4().hex[:12]}')}/state"

    def where_(where: str) -> dict:
        bucket, _, prefix = where[len("s3://"):].partition("/")
        return {"Bucket": bucket, "Key": f"{prefix}/{LEASE}"}

    def read(where: str = url) -> dict | None:
        try:
            return json.loads(client.get_object(**where_(where))["Body"].read())
        except client.exceptions.NoSuchKey:
            return None

    def write(record: dict, where: str = url) -> None:
        client.put_object(**where_(where), Body=json.dumps(record).encode())

    return url, read, write


def _other_run(heartbeat: float) -> dict:
    return {"owner": "someone-else", "host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00Z",
            "heartbeat": heartbeat}


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_one_holder_at_a_time_and_a_dead_holder_expires(state):
    url, read, _ = state
    first = Lease(url, stale_after_s=3, heartbeat_s=0.5).acquire()
    time.sleep(3.5)  # longer than stale_after_s: the heartbeat keeps it fresh
    with pytest.raises(LeaseHeldError, match="refused: another run holds"):
        Lease(url, stale_after_s=3, heartbeat_s=0.5).acquire()
    first.check("the next phase")
    first.release()
    assert read() is None
    with Lease(url, stale_after_s=3, heartbeat_s=0.5):
        pass  # released: free again

    dead = Lease(url, stale_after_s=2, heartbeat_s=0.5).acquire()
    dead._stop.set()  # the holder dies without releasing: no more heartbeats
    time.sleep(2.5)
    with Lease(url, stale_after_s=2, heartbeat_s=0.5) as taker:
        assert read()["owner"] == taker.owner


def test_runs_started_together_exactly_one_goes_every_time(state):
    """Twenty rounds of two runs started at the same moment, on a free lease and on a dead run's stale
    lease (both take it over at once): exactly one holds it each time, the other is refused."""
    url, read, write = state
    for round_ in range(20):
        where = f"{url}/round-{round_}"
        if round_ % 2:
            write(_other_run(heartbeat=time.time() - 60), where)
        outcomes, barrier = {}, threading.Barrier(2)

        def start(i: int) -> None:
            lease = Lease(where, stale_after_s=10, heartbeat_s=1)
            barrier.wait()
            try:
                lease.acquire()
                outcomes[i] = lease
            except LeaseHeldError as err:
                outcomes[i] = err

        threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        held = [o for o in outcomes.values() if isinstance(o, Lease)]
        refused = [o for o in outcomes.values() if isinstance(o, LeaseHeldError)]
        assert len(held) == 1 and len(refused) == 1, f"round {round_}: {outcomes}"
        held[0].check("the next phase")
        held[0].release()


def test_a_lease_taken_over_by_another_run_is_lost_and_the_next_phase_check_stops_the_run(state):
    """Another run took the lease (its clock said ours was stale): our heartbeat must not write over
    it, the lease is marked lost, the next phase check raises, and release leaves the other's lease."""
    url, read, write = state
    holder = Lease(url, stale_after_s=3, heartbeat_s=0.2).acquire()
    write(_other_run(heartbeat=time.time()))
    _until(lambda: holder.lost is not None)
    assert "someone-else" in holder.lost
    time.sleep(0.5)  # a few more heartbeat periods
    assert read()["owner"] == "someone-else"
    with pytest.raises(LeaseLostError, match=r"before training.*someone-else"):
        holder.check("training")
    holder.release()
    assert read()["owner"] == "someone-else"


def test_a_holder_whose_storage_fails_is_lost(state):
    """The heartbeat fails with an error other than 'not found' (the state directory became a file; the
    bucket is gone): the lease is marked lost with that error, and the next phase check raises."""
    url, read, _ = state
    # The first heartbeat comes 1 s after acquire: the storage is broken well before it (the lease object
    # is deleted before the bucket, and a heartbeat in between would only see it gone).
    holder = Lease(url, stale_after_s=3, heartbeat_s=1).acquire()
    if url.startswith("s3://"):
        import boto3

        client, (bucket, _, prefix) = boto3.client("s3"), url[len("s3://"):].partition("/")
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{LEASE}")
        bucket_ = boto3.resource("s3").Bucket(bucket)
        bucket_.objects.all().delete()
        bucket_.delete()
        expected = "NoSuchBucket"
    else:
        shutil.rmtree(url)
        Path(url).write_text("not a directory")
        expected = "NotADirectoryError"
    _until(lambda: holder.lost is not None)
    assert expected in holder.lost
    with pytest.raises(LeaseLostError, match=f"before registration.*{expected}"):
        holder.check("registration")
    holder.release()  # not ours any more: it leaves the storage alone


def test_a_retrain_run_that_loses_its_lease_stops_before_training_with_exit_code_5(
        ray_cluster, mlflow_server, tmp_path, capsys):
    """The retraining job, in process: as soon as it holds its lease, another run takes it over. It
    stops at the next phase check, before any training or registration, with exit code 5 and a message
    naming the other run; the attempt record stays for the rerun that finishes it."""
    import yaml
    from prep_factory import plain_shards

    from pipelines import registry, retrain

    source = plain_shards(tmp_path / "src", shards=1, per_shard=6)
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({
        "prep": {"source": {"url": str(source), "format": "webdataset"}, "filters": {"min_side": 64},
                 "encode": {"flavor": "tiny", "resolution": 128, "batch_size": 16},
                 "output": {"url": str(tmp_path / "cache")}},
        "train": {"model": {"flavor": "tiny"}, "data": {"batch_size": 2},
                  "checkpoint": {"storage_path": str(tmp_path / "runs"), "run_name": "lost"},
                  "parallel": {"num_workers": 1, "cpus_per_worker": 1},
                  "tracking": {"tracking_uri": mlflow_server, "experiment": "tests-lease"}, "steps": 2},
        "model_name": "stage-c-lease-lost",
        "lease": {"stale_after_s": 30, "heartbeat_s": 0.2},
    }))
    state = tmp_path / "runs" / "retrain"

    def take_over() -> None:  # as soon as the run holds the lease: mostly before prep, else during it
        deadline = time.monotonic() + 120
        while not (state / LEASE).exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        (state / LEASE).write_text(json.dumps(_other_run(heartbeat=time.time())))

    thief = threading.Thread(target=take_over)
    thief.start()
    code = retrain.main(["--config", str(config)])
    thief.join()
    err = capsys.readouterr().err
    assert code == retrain.LEASE_LOST, err
    assert re.search(r"stopped before (data prep|training): this run no longer holds the lease .*someone-else",
                     err), err
    assert (state / "attempt.json").exists() and not (state / "summaries").exists()
    assert json.loads((state / LEASE).read_text())["owner"] == "someone-else"  # left to its holder
    assert registry.versions(registry.client(mlflow_server), "stage-c-lease-lost") == []
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["retrain"]  # no training run began
