"""The order of the training data, end to end on Ray Train with 2 CPU workers: each rank writes the
keys of every batch it trains on (data.order_log), and the tests read those logs."""

import json
from pathlib import Path

import pytest
from test_train import train_config

from data_prep.cache import Cache
from pipelines.config import ConfigError, load
from pipelines.train import run_training
from pipelines.training.config import TrainConfig
from pipelines.training.data import epoch_seed, is_validation

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
        assert sorted(sum(by_epoch[rank, 0], [])) == sorted(sum(by_epoch[rank, 1], [])), "a rank's rows stay its own"
    mixed = [b for b in by_epoch[0, 0] + by_epoch[1, 0] if len({shard_of[k] for k in b}) > 1]
    assert len(mixed) >= 4, "batches must mix the cache's source shards"


def test_a_shuffle_buffer_under_two_batches_is_refused():
    # Ray's shuffling batcher would hand out short batches in mid-epoch (ray#66085).
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer must be 0 \(no shuffle\) or at least 2 \* data.batch_size = 64"):
        load(TrainConfig, None, ["data.batch_size=32", "data.shuffle_buffer=40"])
    assert load(TrainConfig, None, ["data.batch_size=32", "data.shuffle_buffer=0"]).data.shuffle_buffer == 0


def test_the_epoch_seed_is_new_for_each_epoch_and_rank_and_the_same_when_they_come_again():
    seeds = {(s, e, r): epoch_seed(s, e, r) for s in (0, 1) for e in range(3) for r in range(2)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(epoch_seed(*k) == v for k, v in seeds.items())
