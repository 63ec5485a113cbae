"""Which cache rows a run trains and validates on: the held-out split by key hash, the mix of new
shards and replay, as Ray Datasets (each block's rows scattered by the seed, and Ray Train's split of
them across the workers), or for a small cache as each worker's own read of the files (`worker_rows`).

Torch-free on purpose: the functions here run in Ray Data's task processes, and each process that
unpickles one imports its module; with torch that cost each of them seconds of CPU before its first
block. The workers' side (batches, tensors, equal steps) is `pipelines.training.data`."""

import zlib

import numpy as np
import pyarrow as pa

from latent_cache.reader import SPLIT_BUCKETS, Cache, split


def _mix(batch: pa.Table, shards: list[str], replay_fraction: float, columns: list[str]) -> pa.Table:
    """Rows of `shards`, plus a replay share of the other rows (chosen by key hash: the same rows
    whatever the order); then only `columns`."""
    wanted = set(shards)
    mask = [s in wanted or zlib.crc32(f"replay:{k}".encode()) % SPLIT_BUCKETS < replay_fraction * SPLIT_BUCKETS
            for s, k in zip(batch.column("source_shard").to_pylist(), batch.column("key").to_pylist())]
    return batch.filter(pa.array(mask, pa.bool_())).select(columns)


def _scatter(batch: pa.Table, seed: int) -> pa.Table:
    """The rows of a block in an order drawn from their keys and the seed. Ray Train hands each worker
    whole blocks or contiguous pieces of one, and a cache file holds its rows in prep order (source
    shard after source shard): scattered first, a worker's share mixes the file's source shards."""
    order = np.argsort([zlib.crc32(f"{seed}:{k}".encode()) for k in batch.column("key").to_pylist()], kind="stable")
    return batch.take(pa.array(order))


def datasets(cache: Cache, columns: list[str], validation_fraction: float, shards: list[str] | None = None,
             replay_fraction: float = 1.0, seed: int = 0, bucket: str | None = None):
    """(train, validation) Ray Datasets of `columns` (what the task's batches hold), of one aspect-ratio
    bucket's rows (None: a cache of one). With `shards`, training sees the rows of those source
    shards plus `replay_fraction` of the others; validation always covers the held-out rows of the
    whole cache (the fixed evaluation). The training rows of each block are scattered by `seed`
    (see `_scatter`)."""
    ds = cache.ray_dataset(columns=columns + (["source_shard"] if shards is not None else []), bucket=bucket)
    kwargs = {"batch_format": "pyarrow", "fn_kwargs": {"fraction": validation_fraction}}
    train = ds.map_batches(split, **kwargs | {"fn_kwargs": {"fraction": validation_fraction, "validation": False}})
    val = ds.map_batches(split, **kwargs | {"fn_kwargs": {"fraction": validation_fraction, "validation": True}})
    if shards is not None:
        train = train.map_batches(_mix, batch_format="pyarrow",
                                  fn_kwargs={"shards": list(shards), "replay_fraction": replay_fraction, "columns": columns})
        val = val.select_columns(columns)
    return train.map_batches(_scatter, batch_format="pyarrow", fn_kwargs={"seed": seed}), val


def worker_rows(cache: Cache, columns: list[str], validation_fraction: float, rank: int, world: int,
                shards: list[str] | None = None, replay_fraction: float = 1.0, bucket: str | None = None) -> tuple[pa.Table, pa.Table]:
    """(rank's share of the training rows, the held-out rows), of `columns`, of one aspect-ratio bucket
    (None: a cache of one), read from the cache's files with pyarrow, a file at a time: the training
    rows (mixed as in `datasets` with `shards`) in file order, every world-th of them from the
    rank-th, so the shares are disjoint, together all the training rows, and of sizes that differ by
    one row at most; the held-out rows, all of them, in file order (as Ray Data gives them).

    This is how a worker reads a cache that fits its memory: no Ray Data tasks or split coordinator
    to start, which on a small cache take longer than the read. Rows of one file are the same source
    shard's in a row: taken one in `world`, a share holds each of them, and every epoch is a
    permutation of the whole share (EqualStepBatches), so batches mix the source shards."""
    read = columns + (["source_shard"] if shards is not None and "source_shard" not in columns else [])
    trained, held, seen = [], [], 0
    for table in cache.file_tables(read, bucket):
        held.append(split(table, validation_fraction, validation=True).select(columns))
        train = split(table, validation_fraction, validation=False)
        train = _mix(train, shards, replay_fraction, columns) if shards is not None else train.select(columns)
        trained.append(train.take(pa.array(np.arange((rank - seen) % world, train.num_rows, world), pa.int64())))
        seen += train.num_rows
    if not held:
        raise ValueError(f"the cache at {cache.url} has no rows{f' in bucket {bucket}' if bucket else ''}")
    return pa.concat_tables(trained), pa.concat_tables(held)


def data_config(train: list[str] = ("train",)):
    """Ray Train's dataset config: the `train` datasets (one, or one per aspect-ratio bucket) split
    across the workers, in order (`preserve_order`), so that each worker gets the same rows in the
    same order in every run with the same data and seed: only then does a seeded local shuffle give
    the same order again when a run is resumed (and the batches a checkpoint already used are the
    ones skipped)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=list(train), execution_options={name: options for name in train})
