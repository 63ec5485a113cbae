"""The order of the training data and recovery from a killed worker, end to end on Ray Train with 2
CPU workers: each rank writes the keys of every batch it trains on (data.order_log), and the tests
read those logs."""

import json
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_train import metric_history, train_config

from latent_cache.reader import Cache, is_validation
from core.config import ConfigError, load
from pipelines.train import run_training
from pipelines.training import checkpoint as ckpt_io
from pipelines.training.config import TrainConfig
from pipelines.training.data import epoch_seed
from stages import StageC

STEPS = 8  # two whole epochs: each rank holds 4 batches of 4 of the ~34 training rows
VALIDATION_FRACTION = 0.2  # train_config's


def order_log(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]


def attempts(entries: list[dict]) -> list[list[dict]]:
    """The trained batches of each start of the train function (a restart begins a new list)."""
    out = []
    for entry in entries:
        if "start" in entry:
            out.append([])
        elif "keys" in entry:
            out[-1].append(entry)
    return out


@pytest.fixture(scope="module")
def reference(tiny_cache, mlflow_server, tmp_path_factory):
    """An uninterrupted run: its order logs and MLflow run id."""
    root = tmp_path_factory.mktemp("order-reference")
    cfg = train_config(tiny_cache, str(root / "runs"), mlflow_server, "order-reference", steps=STEPS,
                       **{"data.order_log": str(root / "order")})
    _, run_id = run_training(cfg)
    return root / "order", run_id


def test_every_epoch_is_a_new_order_of_the_training_rows_and_batches_mix_source_shards(reference, tiny_cache):
    folder, _ = reference
    table = Cache(tiny_cache).read_table(columns=["key", "source_shard"])
    shard_of = dict(zip(table.column("key").to_pylist(), table.column("source_shard").to_pylist()))
    training = {k for k in shard_of if not is_validation(k, VALIDATION_FRACTION)}
    # Ray Train gives each rank an equal share, in whole batches (drop_last).
    per_rank = len(training) // 2 // 4 * 4

    batches = {rank: attempts(order_log(folder, rank)) for rank in (0, 1)}
    assert [[len(a) for a in batches[rank]] for rank in (0, 1)] == [[STEPS], [STEPS]]  # one attempt, a batch a step
    by_epoch = {(rank, e): [b["keys"] for b in batches[rank][0] if b["epoch"] == e] for rank in (0, 1) for e in (0, 1)}
    for epoch in (0, 1):
        seen = [k for rank in (0, 1) for batch in by_epoch[rank, epoch] for k in batch]
        assert len(seen) == len(set(seen)) == 2 * per_rank, "each training row at most once an epoch, whole shares"
        assert set(seen) <= training
    for rank in (0, 1):
        assert by_epoch[rank, 0] != by_epoch[rank, 1], f"rank {rank} saw the same order in both epochs"
    mixed = [b for b in by_epoch[0, 0] + by_epoch[1, 0] if len({shard_of[k] for k in b}) > 1]
    assert len(mixed) >= 4, "batches must mix the cache's source shards"


def _kill_when_stalled(marker: Path, killed: list[str]) -> None:
    """Waits for the stalled worker's pid in the marker, checks that it is a live Ray Train worker
    process (Ray titles it ray::RayTrainWorker), and SIGKILLs it. (Ray's state API would need the
    dashboard, which the session's cluster does not start.)"""
    import psutil

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = marker.read_text() if marker.exists() else ""
        if text.endswith("\n"):
            break
        time.sleep(0.2)
    else:
        return
    process = psutil.Process(int(text.split("pid ")[1]))
    title = " ".join(process.cmdline())
    if "RayTrainWorker" in title:
        process.send_signal(signal.SIGKILL)
        killed.append(title)


def test_a_killed_worker_process_is_recovered_with_every_step_logged_once(reference, tiny_cache, mlflow_server, tmp_path):
    marker = tmp_path / "stalled"
    cfg = train_config(tiny_cache, str(tmp_path / "runs"), mlflow_server, "killed", steps=STEPS, max_failures=1, **{
        "data.order_log": str(tmp_path / "order"), "fault.fail_at_step": 5, "fault.rank": 0, "fault.action": "stall",
        "fault.marker": str(marker),
    })
    killed: list[str] = []
    killer = threading.Thread(target=_kill_when_stalled, args=(marker, killed), daemon=True)
    killer.start()
    result, run_id = run_training(cfg)
    killer.join(timeout=10)
    assert len(killed) == 1, "the stalled Ray Train worker was not found alive and killed"
    assert result.metrics["step"] == STEPS

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              filter_string="tags.`wuerstchen.run_name` = 'killed'")
    assert [r.info.run_id for r in runs] == [run_id]
    history = metric_history(mlflow_server, run_id, "loss")
    assert sorted(s for s, _ in history) == list(range(1, STEPS + 1)), "every step logged exactly once"

    # The same seed, the same order: the killed run trained on the reference run's batches up to
    # the kill, and after the restart from the checkpoint of step 3 on the reference's batches from
    # step 4 on; so its losses are the reference's.
    reference_folder, reference_run = reference
    for rank in (0, 1):
        expected = [b["keys"] for b in attempts(order_log(reference_folder, rank))[0]]
        first, second = attempts(order_log(tmp_path / "order", rank))
        assert [b["keys"] for b in first] == expected[: len(first)] and len(first) >= 4
        assert [b["keys"] for b in second] == expected[3:]
    assert dict(history) == pytest.approx(dict(metric_history(mlflow_server, reference_run, "loss")), rel=1e-5)


def test_uneven_shares_take_the_same_steps_on_every_rank(tiny_cache, mlflow_server, tmp_path):
    """Rank 1's share is one batch short every epoch (3 batches against rank 0's 4): both ranks run
    every step, each epoch ends for both when rank 1's runs out, and nothing hangs. Under FSDP2, whose
    collectives (sharded forward and backward, the full checkpoint gathered to rank 0) hang first when
    the ranks disagree.

    Its data comes the way of a cache too large for a worker to read whole but whose shares fit in
    memory (data.memory_limit_mb between the two): Ray Data's split, each share read once into
    memory. (The other runs of this file read the cache in process; test_train's FSDP2 run streams.)"""
    from pipelines.train import reads_in_process, row_bytes, worker_share
    from pipelines.training.tasks import stage_c_columns

    cache = Cache(tiny_cache)
    columns = stage_c_columns(cache.manifest["text_mode"])
    limit = round(0.7 * cache.rows * row_bytes(cache, columns) / 2**20, 6)
    steps = 7  # epochs 0 and 1, and the first batch of epoch 2
    cfg = train_config(tiny_cache, str(tmp_path / "runs"), mlflow_server, "uneven", steps=steps, **{
        "data.order_log": str(tmp_path / "order"), "fault.short_rank": 1, "parallel.strategy": "fsdp2",
        "data.memory_limit_mb": limit,
    })
    assert not reads_in_process(cfg, cache, columns) and worker_share(cfg, cache, columns, 0.4 * cache.rows)[1]
    outcome = {}

    def train():
        try:
            outcome["result"] = run_training(cfg)
        except Exception as err:
            outcome["error"] = err

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    runner.join(timeout=600)
    assert not runner.is_alive(), "training with uneven shares hung"
    assert "error" not in outcome, outcome.get("error")
    result, run_id = outcome["result"]
    assert result.metrics["step"] == steps
    logs = {rank: order_log(tmp_path / "order", rank) for rank in (0, 1)}
    trained = {rank: [(e["epoch"], e["batch"]) for e in logs[rank] if "keys" in e] for rank in (0, 1)}
    assert trained[0] == trained[1] == [(e, b) for e in (0, 1) for b in (0, 1, 2)] + [(2, 0)]
    # Rank 0 really held more: its fourth batch of each epoch was left out when rank 1 ran out.
    assert [e["epoch"] for e in logs[0] if "left_out" in e] == [0, 1]
    assert not [e for e in logs[1] if "left_out" in e]
    assert [s for s, _ in metric_history(mlflow_server, run_id, "loss")] == list(range(1, steps + 1))
    with ckpt_io.latest(cfg.checkpoint).as_directory() as folder:  # the full state, gathered from the shards
        saved = ckpt_io.read(folder)
    assert saved["train_state"]["step"] == steps and saved["model"].keys() == StageC.from_flavor("tiny").state_dict().keys()


def test_a_shuffle_buffer_under_two_batches_is_refused():
    # Ray's shuffling batcher would hand out short batches in mid-epoch (ray#66085).
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer must be 0 \(no shuffle\) or at least 2 \* data.batch_size = 64"):
        load(TrainConfig, None, ["data.batch_size=32", "data.shuffle_buffer=40"])
    assert load(TrainConfig, None, ["data.batch_size=32", "data.shuffle_buffer=0"]).data.shuffle_buffer == 0


def test_the_epoch_seed_is_new_for_each_epoch_and_rank_and_the_same_when_they_come_again():
    seeds = {(s, e, r): epoch_seed(s, e, r) for s in (0, 1) for e in range(3) for r in range(2)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(epoch_seed(*k) == v for k, v in seeds.items())
