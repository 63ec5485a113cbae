"""Training data from the latent cache: a held-out split by key hash, each worker's shard as torch
batches, and a step loop in which every rank takes exactly the same number of batches."""

import time
import zlib

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from data_prep.cache import Cache

# 1 / this is the granularity of the held-out fraction.
_SPLIT_BUCKETS = 10_000


def is_validation(key: str, fraction: float) -> bool:
    """Whether a row is held out: decided by a hash of its key alone, so the split is the same in
    every run, whatever the order or the number of workers."""
    return zlib.crc32(key.encode()) % _SPLIT_BUCKETS < fraction * _SPLIT_BUCKETS


def _split(batch: pa.Table, fraction: float, validation: bool) -> pa.Table:
    mask = [is_validation(k, fraction) == validation for k in batch.column("key").to_pylist()]
    return batch.filter(pa.array(mask, pa.bool_()))


def text_columns(manifest: dict) -> list[str]:
    return ["text_embeddings"] if manifest["text_mode"] == "embeddings" else ["text_tokens", "text_mask"]


def _mix(batch: pa.Table, shards: list[str], replay_fraction: float, columns: list[str]) -> pa.Table:
    """Rows of `shards`, plus a replay share of the other rows (chosen by key hash: the same rows
    whatever the order); then only `columns`."""
    wanted = set(shards)
    mask = [s in wanted or zlib.crc32(f"replay:{k}".encode()) % _SPLIT_BUCKETS < replay_fraction * _SPLIT_BUCKETS
            for s, k in zip(batch.column("source_shard").to_pylist(), batch.column("key").to_pylist())]
    return batch.filter(pa.array(mask, pa.bool_())).select(columns)


def datasets(cache: Cache, validation_fraction: float, shards: list[str] | None = None, replay_fraction: float = 1.0):
    """(train, validation) Ray Datasets with the columns the Stage C objective needs. With `shards`,
    training sees the rows of those source shards plus `replay_fraction` of the others; validation
    always covers the held-out rows of the whole cache (the fixed evaluation)."""
    columns = ["key", "stage_c_latents", *text_columns(cache.manifest)]
    ds = cache.ray_dataset(columns=columns + (["source_shard"] if shards is not None else []))
    kwargs = {"batch_format": "pyarrow", "fn_kwargs": {"fraction": validation_fraction}}
    train = ds.map_batches(_split, **kwargs | {"fn_kwargs": {"fraction": validation_fraction, "validation": False}})
    val = ds.map_batches(_split, **kwargs | {"fn_kwargs": {"fraction": validation_fraction, "validation": True}})
    if shards is not None:
        train = train.map_batches(_mix, batch_format="pyarrow",
                                  fn_kwargs={"shards": list(shards), "replay_fraction": replay_fraction, "columns": columns})
        val = val.select_columns(columns)
    return train, val


def to_tensors(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """A numpy batch of the cache's columns -> float32 / int64 tensors on `device` (keys stay strings)."""
    out = {}
    for name, value in batch.items():
        if name == "key":
            out[name] = [str(k) for k in value]
        elif name in ("text_tokens", "text_mask"):
            out[name] = torch.as_tensor(np.asarray(value), dtype=torch.long, device=device)
        else:
            out[name] = torch.as_tensor(np.asarray(value, dtype=np.float32), device=device)
    return out


def _all_ranks_have(has_batch: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class EqualStepBatches:
    """Endless batches from a worker's dataset shard, epoch after epoch, in lockstep across ranks.

    Before each batch the ranks agree (a one-integer all-reduce) that every one of them has one;
    when any rank's epoch runs out, all of them start the next epoch together. So every rank runs
    the same number of steps whatever the block sizes or the split (ray#66085), and no rank waits
    forever in a collective its peers never enter.
    """

    def __init__(self, shard, batch_size: int, device: torch.device, skip_batches: int = 0, epoch: int = 0):
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.epoch = epoch
        self.batch_in_epoch = 0
        self.wait_seconds = 0.0
        self._iterator = None
        self._skip = skip_batches  # resuming inside an epoch: the batches the checkpoint already used

    def _new_epoch_iterator(self):
        return iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True))

    def next(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self._iterator = self._new_epoch_iterator()
                self.batch_in_epoch = 0
            batch = next(self._iterator, None)
            if _all_ranks_have(batch is not None, self.device):
                self.batch_in_epoch += 1
                if self._skip > 0:
                    self._skip -= 1
                    continue
                self.wait_seconds += time.perf_counter() - start
                return to_tensors(batch, self.device)
            self._iterator = None
            self.epoch += 1
            empty_epochs = empty_epochs + 1 if self.batch_in_epoch == 0 else 0
            if empty_epochs >= 2:
                raise ValueError(
                    f"a worker's share of the training data holds fewer than batch_size={self.batch_size} rows: "
                    f"lower data.batch_size or parallel.num_workers, or add data"
                )
