"""Training data on the workers: each worker's shard of the cache's rows (`pipelines.training.rows`)
as torch batches in a new seeded order every epoch, and a step loop in which every rank takes exactly
the same number of batches."""

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle's seed for one rank's epoch: a new order every epoch, the same one whenever
    (seed, epoch, rank) comes again. numpy's SeedSequence mixes the three into independent streams (it
    takes non-negative numbers only: a negative seed is read modulo 2**64)."""
    return int(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, rank]).generate_state(1)[0])


def _host_tensor(value) -> torch.Tensor:
    """A numpy column as a CPU tensor of its own dtype (fp16 stays fp16: half the bytes to the device);
    copied only when Ray handed it read-only."""
    array = np.asarray(value)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the device; to a GPU from pinned memory and without waiting (a copy from pageable memory
    would wait for the GPU's queued work: a host sync per batch)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_tensors(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """A numpy batch of the cache's columns -> tensors on `device`: latents and embeddings float32,
    converted there (they travel in the cache's dtype), tokens int64, keys and captions strings, the
    uint8 HWC images (B, 3, H, W) floats in [0, 1] (they travel as bytes)."""
    out = {}
    for name, value in batch.items():
        if name in ("key", "caption"):
            out[name] = [str(k) for k in value]
        elif name in ("text_tokens", "text_mask"):
            out[name] = _to_device(_host_tensor(value), device).long()
        elif name in ("images", "semantic_images"):
            out[name] = _to_device(_host_tensor(np.asarray(value, dtype=np.uint8)), device).permute(0, 3, 1, 2).float().div_(255.0)
        else:
            out[name] = _to_device(_host_tensor(value), device).float()
    return out


def _all_ranks_have(has_batch: bool, group) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return has_batch
    flag = torch.tensor([1 if has_batch else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def in_background(read) -> Future:
    """`read()` started now in a thread of its own; the Future's result() waits for it (and raises
    what it raised). A worker reads its data this way while it builds its model: on a small cache the
    first read (Ray Data starting its tasks) takes as long as the build, and the first step waited
    for both in turn."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-read")
    try:
        return pool.submit(read)
    finally:
        pool.shutdown(wait=False)


def host_group():
    """A process group of every rank on the CPU (gloo) for the host-side agreements of the data loop,
    so that they never wait on the GPU's queue: the default group when it is gloo already, else a new
    one (a collective call: every rank must make it, in the same order). None when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


class EqualStepBatches:
    """Endless batches from a worker's dataset shard, epoch after epoch, in lockstep across ranks.

    Before each batch the ranks agree (a one-integer all-reduce on the CPU) that every one of them has one;
    when any rank's epoch runs out, all of them start the next epoch together. So every rank runs
    the same number of steps whatever the block sizes or the split (ray#66085), and no rank waits
    forever in a collective its peers never enter.

    With `shuffle_buffer` rows, each epoch's batches come from Ray Data's local shuffle seeded by
    `epoch_seed(seed, epoch, rank)`: a new order every epoch, and on resume the same order as the
    interrupted epoch, so skipping the batches the checkpoint used skips exactly those rows.

    `in_memory`: the shard is read once, in the background from construction on, and every epoch is
    a permutation of those rows in memory, drawn from the same `epoch_seed` (with a shuffle buffer;
    else the order read): no re-read of the cache at each epoch boundary, where Ray Data's streaming
    split executes the read pipeline again and the step waits for it (on a small cache, most of the
    run's time).

    `read` (instead of a shard): a function that returns the worker's rows as one numpy batch (a
    column -> array), read in memory as above; see pipelines.training.rows.worker_rows."""

    def __init__(self, shard, batch_size: int, device: torch.device, shuffle_buffer: int = 0, seed: int = 0,
                 rank: int = 0, order_log: str | None = None, in_memory: bool = False, read=None):
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self._group = host_group()  # every rank builds its batches at the same point of the loop
        self.shuffle_buffer, self.seed, self.rank = shuffle_buffer, seed, rank
        self.in_memory = in_memory or read is not None
        self._rows = in_background(read or self._read_once) if self.in_memory else None
        self.epoch = 0
        self.batch_in_epoch = 0
        self.wait_seconds = 0.0
        self._iterator = None
        self._skip = 0  # resuming inside an epoch: the batches the checkpoint already used
        self._order_log = Path(order_log, f"rank{rank}.jsonl") if order_log else None
        self._started = False  # the order log's "start" entry is written with the first batch

    def state_dict(self) -> dict:
        """The data position: the epoch and the batches of it taken so far."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, position: dict) -> None:
        """Resumes at a `state_dict` position (before the first batch): the batches of the epoch that
        were taken are skipped."""
        if self._started:
            raise RuntimeError("the data position can only be set before the first batch")
        self.epoch, self._skip = position["epoch"], position["batch_in_epoch"]

    def _record(self, entry: dict) -> None:
        if self._order_log is not None:
            self._order_log.parent.mkdir(parents=True, exist_ok=True)
            with self._order_log.open("a") as f:  # a line at a time: a killed worker leaves whole lines
                f.write(json.dumps(entry) + "\n")

    def _read_once(self) -> dict[str, np.ndarray]:
        parts = list(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=False))
        if not parts:
            return {}
        return {name: np.concatenate([np.asarray(part[name]) for part in parts]) for name in parts[0]}

    def _memory_epoch(self):
        rows = self._rows.result()
        count = len(rows["key"]) if rows else 0
        order = (np.random.default_rng(epoch_seed(self.seed, self.epoch, self.rank)).permutation(count)
                 if self.shuffle_buffer else np.arange(count))
        for start in range(0, count - self.batch_size + 1, self.batch_size):
            picked = order[start:start + self.batch_size]
            yield {name: values[picked] for name, values in rows.items()}

    def _new_epoch_iterator(self):
        if self.in_memory:
            return self._memory_epoch()
        shuffle = {}
        if self.shuffle_buffer:
            shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer,
                       "local_shuffle_seed": epoch_seed(self.seed, self.epoch, self.rank)}
        return iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True, **shuffle))

    def next(self) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        if not self._started:
            self._started = True
            self._record({"start": {"epoch": self.epoch, "skip": self._skip}})
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self._iterator = self._new_epoch_iterator()
                self.batch_in_epoch = 0
            batch = next(self._iterator, None)
            if _all_ranks_have(batch is not None, self._group):
                self.batch_in_epoch += 1
                if self._skip > 0:
                    self._skip -= 1
                    continue
                self.wait_seconds += time.perf_counter() - start
                self._record({"epoch": self.epoch, "batch": self.batch_in_epoch - 1, "keys": [str(k) for k in batch["key"]]})
                return to_tensors(batch, self.device)
            if batch is not None:  # a peer's epoch ran out first: left out, as the epoch ends for all
                self._record({"epoch": self.epoch, "left_out": len(batch["key"])})
            self._iterator = None
            self.epoch += 1
            empty_epochs = empty_epochs + 1 if self.batch_in_epoch == 0 else 0
            if empty_epochs >= 2:
                raise ValueError(
                    f"a worker's share of the training data holds fewer than batch_size={self.batch_size} rows: "
                    f"lower data.batch_size or parallel.num_workers, or add data"
                )


class BucketBatches:
    """Batches of a cache's aspect-ratio buckets, one bucket a batch (each bucket's tensors have their
    own shapes), in lockstep across ranks: every draw picks the same bucket on every rank, drawn from
    (seed, draw) with the buckets weighted by their training rows, and then that bucket's
    EqualStepBatches agrees its batch as usual. So every rank runs the same steps, and a resumed run
    draws the same buckets again from its draw count."""

    def __init__(self, per_bucket: dict[str, "EqualStepBatches"], weights: dict[str, float], seed: int):
        self.per_bucket, self.names, self.seed = per_bucket, list(per_bucket), seed
        p = np.array([float(weights[b]) for b in self.names])
        self.p = p / p.sum()
        self.draws = 0

    @property
    def wait_seconds(self) -> float:
        return sum(b.wait_seconds for b in self.per_bucket.values())

    def state_dict(self) -> dict:
        return {"draws": self.draws, "buckets": {b: batches.state_dict() for b, batches in self.per_bucket.items()}}

    def load_state_dict(self, position: dict) -> None:
        self.draws = position["draws"]
        for b, batches in self.per_bucket.items():
            batches.load_state_dict(position["buckets"][b])

    def bucket_of_draw(self, draw: int) -> str:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFF_FFFF_FFFF_FFFF, draw]))
        return self.names[int(rng.choice(len(self.names), p=self.p))]

    def next(self) -> dict[str, torch.Tensor]:
        bucket = self.bucket_of_draw(self.draws)
        self.draws += 1
        return self.per_bucket[bucket].next()
