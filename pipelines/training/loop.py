"""The per-worker training loop (the `train_loop_per_worker` of Ray Train's TorchTrainer), composed
from built parts: the task (what is specific to the model trained, tasks.py), the train state
(state.py) and the checkpointer (checkpoint.py).

Every rank builds the same model, applies the parallelism, reads its shard of the cache, and runs
exactly `steps` optimizer steps; rank 0 logs to MLflow and writes the checkpoints, which every rank
reports to Ray Train (a barrier) so that a failed run restarts from the newest one.
"""

import contextlib
import math
import os
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from latent_cache.reader import Cache, numpy_batches, numpy_columns
from pipelines.training.checkpoint import Checkpointer
from pipelines.training.config import FaultConfig, TrainConfig
from pipelines.quality import bucket_mean
from pipelines.training.data import BucketBatches, EqualStepBatches, in_background
from pipelines.training.ema import Ema
from pipelines.training.parallel import full_model_state, grad_norm_and_clip, reshard
from pipelines.training.plan import TrainPlan
from pipelines.training.rows import worker_rows
from pipelines.training.state import TrainState
from pipelines.training.tracking import MetricLogger

class ValidationSet:
    """The held-out rows (of a bucket), read once and then kept in memory (a small fraction of the
    cache), so that validating does not re-read the cache every time: from the worker's read of the
    cache's files (`rows`, see `rows_in_process`) where the plan says so, else from the worker's Ray
    Dataset. The read starts at construction, in the background: the first validation does not wait
    for it."""

    def __init__(self, plan: TrainPlan, bucket: str | None = None, rows: Future | None = None):
        import ray.train

        size = plan.cfg.data.batch_size
        if rows is not None:
            def read():
                return numpy_batches(rows.result()[1], size)
        else:
            shard = ray.train.get_dataset_shard("val" if bucket is None else f"val_{bucket}")

            def read():
                return list(shard.iter_batches(batch_size=size, batch_format="numpy"))
        self._batches = in_background(read)

    def __iter__(self):
        return iter(self._batches.result())

    @property
    def rows(self) -> int:
        return sum(len(batch["key"]) for batch in self)


# How long a "stall" fault waits for the test to kill the worker before failing by itself.
_STALL_SECONDS = 600


def validate(model, ema: Ema, val_set, task, probes: dict | None = None) -> dict[str, float]:
    """The validation figures of the trained weights and, with an EMA, of the EMA weights (what a
    checkpoint's ema/ holds and what gets registered): val_loss_raw / val_loss_ema as in
    checkpoint.VAL_LOSS, and val_<figure>_raw / _ema for a task's other figures (Stage A's PSNR).
    `val_set`: the held-out batches, or for a cache of aspect-ratio buckets bucket -> its held-out
    batches (with `probes`, bucket -> its Stage C retrieval rows): then every bucket is validated on
    its own, each figure is the mean over the buckets weighted by their held-out rows, and
    val_loss_<bucket>_raw / _ema is each bucket's loss. Every rank runs it (FSDP2 needs them all)."""
    out = _named(_figures(model, val_set, task, probes), "raw")
    if ema.shadow:
        with ema.swapped_in(model):
            out.update(_named(_figures(model, val_set, task, probes), "ema"))
    return out


def _figures(model, val_set, task, probes: dict | None) -> dict[str, float]:
    if not isinstance(val_set, dict):
        return task.validation_loss(model, val_set)
    figures, rows = {}, {}
    for bucket, batches in val_set.items():
        rows[bucket] = batches.rows
        if rows[bucket]:
            with _probe(task, (probes or {}).get(bucket)):
                found = task.validation_loss(model, batches)
            figures[bucket] = found if isinstance(found, dict) else {"loss": found}
    return bucket_mean(figures, rows)


@contextlib.contextmanager
def _probe(task, probe: dict | None):
    """Stage C's retrieval rows of one bucket in place of the task's while it validates that bucket."""
    if not hasattr(task, "train_probe"):
        yield
        return
    saved, task.train_probe = task.train_probe, probe
    try:
        yield
    finally:
        task.train_probe = saved


def log_validation_picture(state: TrainState, task, val_set, logger: MetricLogger | None, probes: dict | None = None) -> None:
    """A task's picture of its held-out rows (Stage A: originals over reconstructions), made with the
    EMA weights when there are (what gets registered), to MLflow as validation/step_<step>.png; for a
    cache of buckets, of its bucket with the most held-out rows. Every rank makes it (FSDP2 needs them
    all); rank 0 logs it."""
    if not hasattr(task, "validation_picture"):
        return
    bucket = None
    if isinstance(val_set, dict):
        bucket = max(val_set, key=lambda b: val_set[b].rows)
        val_set = val_set[bucket]
    model = state.model
    with state.ema.swapped_in(model) if state.ema.shadow else contextlib.nullcontext(), \
            _probe(task, (probes or {}).get(bucket)) if bucket is not None else contextlib.nullcontext():
        picture = task.validation_picture(model, val_set)
    if logger is not None and picture is not None:
        logger.image(picture, f"validation/step_{state.step:08d}.png")


def _named(figures, weights: str) -> dict[str, float]:
    figures = figures if isinstance(figures, dict) else {"loss": figures}
    return {f"val_{name}_{weights}": value for name, value in figures.items()}


def _maybe_fail(fault: FaultConfig, step: int, rank: int) -> None:
    if fault.fail_at_step is None or step != fault.fail_at_step or rank != fault.rank:
        return
    marker = Path(fault.marker) if fault.marker else None
    if marker is not None and marker.exists():
        return
    if fault.action == "stall":
        marker.write_text(f"stalled at step {step}, pid {os.getpid()}\n")
        time.sleep(_STALL_SECONDS)  # until the test kills this process
    elif marker is not None:
        marker.write_text(f"failed once at step {step}\n")
    raise RuntimeError(f"injected test fault at step {step} on rank {rank}")


class _OneBatchShort:
    """Test-only (fault.short_rank): a worker's dataset shard without the first batch of each epoch,
    so that the ranks' shares are really uneven."""

    def __init__(self, shard):
        self.shard = shard

    def iter_batches(self, **kwargs):
        batches = iter(self.shard.iter_batches(**kwargs))
        next(batches, None)
        return batches


def train_func(config: dict) -> None:
    import ray.data
    import ray.train
    import ray.train.torch

    plan: TrainPlan = config["plan"]
    cfg, task = plan.cfg, plan.task
    ray.data.DataContext.get_current().enable_progress_bars = False  # the step lines below show progress
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + rank)

    # build (the data is read in the background meanwhile, where it is held in memory)
    names = [None] if plan.buckets is None else list(plan.buckets)
    rows = {b: rows_in_process(plan, rank, world, b) for b in names} if plan.cache_in_process else {b: None for b in names}
    batches = training_batches(plan, rank, device, rows)
    if plan.buckets is None:
        val_set, probes = ValidationSet(plan, rows=rows[None]), None
    else:
        val_set = {b: ValidationSet(plan, b, rows[b]) for b in plan.buckets}
        probes = {b: info["probe"] for b, info in plan.buckets.items()}
    state = TrainState.build(task.build_model(plan.init_state), batches, cfg, device)
    checkpointer = Checkpointer(plan, rank, world)
    # restore
    resumed = checkpointer.restore(state)
    task.setup(device)
    logger = MetricLogger(plan.tracking_uri, plan.mlflow_run_id) if rank == 0 else None
    if resumed:
        note_resume(state, logger)
    elif logger is not None:  # a restart before the first checkpoint reruns steps a failed attempt logged
        logger.skip_logged("loss")
    # loop, saving every checkpoint.every_steps
    meter = StepMeter(state.batches, cfg.data.batch_size * cfg.optim.grad_accum * world, state.step)
    while state.step < cfg.steps:
        loss, grad_norm = train_step(state, task, cfg, rank)
        last = state.step == cfg.steps
        validated = state.step % cfg.validation.every_steps == 0 or last
        logged = state.step % cfg.tracking.log_every == 0 or validated
        saved = state.step % cfg.checkpoint.every_steps == 0 or last
        if not (logged or saved):
            continue  # nothing read back from the device: the host runs ahead of the GPU
        metrics = meter.read(loss, grad_norm, state)  # every rank, at the same steps
        if validated:
            with state.autocast():
                metrics.update(validate(state.model, state.ema, val_set, task, probes))
                log_validation_picture(state, task, val_set, logger, probes)
            reshard(state.model)
        if logger is not None and logged:
            report_step(logger, metrics, state.step, cfg.steps)
        if saved:
            checkpointer.save(state, metrics)
        meter.restart(state.step)  # the rates leave validation and checkpoint time out
    if logger is not None and not logger.flush():
        logger.flush()


def rows_in_process(plan: TrainPlan, rank: int, world: int, bucket: str | None = None) -> Future:
    """This worker's (training share, held-out rows) of the cache (of a bucket) as pyarrow tables, read
    from the cache's files in the background (rows.worker_rows), where plan.cache_in_process says so."""
    cfg = plan.cfg

    def read():
        d = cfg.data
        train, held = worker_rows(Cache(plan.cache_in_process), plan.task.columns, d.validation_fraction, rank, world,
                                  d.shards, d.replay_fraction, bucket)
        if cfg.fault.short_rank == rank:  # test-only: the share one batch short (see _OneBatchShort)
            train = train.slice(d.batch_size)
        return train, held

    return in_background(read)


def training_batches(plan: TrainPlan, rank: int, device, rows: dict[str | None, Future | None]) -> EqualStepBatches | BucketBatches:
    """This worker's training batches: of its share of the training rows (read in process: `rows`,
    bucket -> rows_in_process; else its shard of the Ray Dataset `train`), or for a cache of
    aspect-ratio buckets of each trained bucket's share, one bucket a batch (BucketBatches)."""
    import ray.train

    cfg = plan.cfg

    def of(bucket: str | None, in_memory: bool, seed: int) -> EqualStepBatches:
        options = dict(shuffle_buffer=cfg.data.shuffle_buffer, seed=seed, rank=rank, order_log=cfg.data.order_log)
        if rows[bucket] is not None:
            def read(share=rows[bucket]):
                train = share.result()[0]
                return numpy_columns(train) if train.num_rows else {}
            return EqualStepBatches(None, cfg.data.batch_size, device, read=read, **options)
        shard = ray.train.get_dataset_shard("train" if bucket is None else f"train_{bucket}")
        return EqualStepBatches(_OneBatchShort(shard) if cfg.fault.short_rank == rank else shard, cfg.data.batch_size,
                                device, in_memory=in_memory, **options)

    if plan.buckets is None:
        return of(None, plan.in_memory, cfg.seed)
    per_bucket = {b: of(b, info["in_memory"], cfg.seed + i)  # each bucket its own orders
                  for i, (b, info) in enumerate(plan.buckets.items()) if info["trained"]}
    return BucketBatches(per_bucket, {b: plan.buckets[b]["rows"] for b in per_bucket}, cfg.seed)


def train_step(state: TrainState, task, cfg: TrainConfig, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step (over `optim.grad_accum` micro-batches) and the EMA update; its loss and the
    gradients' norm before clipping, left on the device (see StepMeter)."""
    state.seed_step(rank)
    model, o = state.model, cfg.optim
    state.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=state.device)
    for micro in range(o.grad_accum):
        batch = state.batches.next()
        sync = micro == o.grad_accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        context_manager = model.no_sync() if not sync else contextlib.nullcontext()
        with context_manager, state.autocast():
            loss = task.loss(model, batch, state.generator)
            (loss / o.grad_accum).backward()
        loss_sum += loss.detach().float() / o.grad_accum
    grad_norm = grad_norm_and_clip(model, o.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    state.ema.update(model, state.step, last=state.step == cfg.steps)
    _maybe_fail(cfg.fault, state.step, rank)
    return loss_sum, grad_norm


class StepMeter:
    """The figures of a logged step, read from the device in one transfer (the step's loss and gradient
    norm), with the rates over the steps since the previous read: reading every step would make the
    host wait for the GPU at every step. A non-finite loss stops the run at the read, before any
    checkpoint takes the weights (every checkpoint step is a read)."""

    def __init__(self, batches: EqualStepBatches, samples_per_step: int, step: int):
        self.batches, self.samples_per_step = batches, samples_per_step
        self.restart(step)

    def restart(self, step: int) -> None:
        """The rates count from here, after `step`."""
        self.start, self.wait_start, self.from_step = time.perf_counter(), self.batches.wait_seconds, step

    def read(self, loss: torch.Tensor, grad_norm: torch.Tensor, state: TrainState) -> dict[str, float]:
        loss_value, norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()  # the one sync
        seconds = time.perf_counter() - self.start
        figures = {
            "loss": loss_value, "lr": state.scheduler.get_last_lr()[0], "grad_norm": norm_value,
            "samples_per_s": self.samples_per_step * (state.step - self.from_step) / seconds,
            "data_wait_fraction": (self.batches.wait_seconds - self.wait_start) / seconds,
        }
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss is {loss_value} at step {state.step}: stopping before the weights are ruined")
        self.restart(state.step)
        return figures


def note_resume(state: TrainState, logger: MetricLogger | None) -> None:
    """Tags what the resumed run starts from, for anyone checking that a resume loses nothing (a
    gather every rank joins, once per resume), and has rank 0 skip the steps already logged."""
    from latent_cache.encoders import state_digest

    resumed_state = full_model_state(state.model)  # what a checkpoint holds: a LoRA's adapter only
    if logger is not None:
        logger.tag(f"resume.step_{state.step}.weights_sha256", state_digest(resumed_state))
        logger.skip_logged("loss")


def report_step(logger: MetricLogger, metrics: dict[str, float], step: int, steps: int) -> None:
    """Rank 0: the step's metrics to MLflow and its step line to the console (Ray forwards it to the driver)."""
    logger.log(metrics, step)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(f"step {step}/{steps}: {shown}", flush=True)
