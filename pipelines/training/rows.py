"""Which cache rows a run trains and validates on, as Ray Datasets: the held-out split by key hash,
the mix of new shards and replay, each block's rows scattered by the seed, and Ray Train's split of
them across the workers.

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
