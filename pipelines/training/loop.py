"""The per-worker training loop of Stage C (the `train_loop_per_worker` of Ray Train's TorchTrainer).

Every rank builds the same model, applies the parallelism, reads its shard of the cache, and runs
exactly `steps` optimizer steps; rank 0 logs to MLflow and writes the checkpoints, which every rank
reports to Ray Train (a barrier) so that a failed run restarts from the newest one.
"""

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from core.config import from_dict
from pipelines.training import checkpoint as ckpt_io
from pipelines.training.config import TrainConfig
from pipelines.training.data import EqualStepBatches, to_tensors
from pipelines.training.ema import Ema
from pipelines.training.parallel import (
    full_model_state,
    grad_norm_and_clip,
    load_optimizer_state,
    optimizer_state,
    parallelize,
    unwrap,
)
from pipelines.training.tracking import MetricLogger
from stages import StageC, StageCConfig
from stages.diffusion import add_noise
from stages.objectives import stage_c_loss, weighted_mse

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, init_state: dict | None) -> StageC:
    model = StageC(StageCConfig(**{**dataclasses.asdict(StageC.flavor_config(cfg.model.flavor)), **cfg.model.overrides}))
    if init_state is not None:
        model.load_state_dict(init_state)
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    return model


def stage_c_from(state: dict, config: StageCConfig) -> StageC:
    with torch.device("meta"):
        model = StageC(config)
    model.load_state_dict(state, assign=True)
    return model


def _text(batch: dict, text_encoder) -> torch.Tensor:
    if "text_embeddings" in batch:
        return batch["text_embeddings"]
    with torch.no_grad():
        return text_encoder(batch["text_tokens"], batch["text_mask"]).float()


def _noise_for(keys: list[str], shape, seed: int, t_index: int) -> torch.Tensor:
    """Fixed noise per (key, t): the same numbers whatever the batching or the number of workers."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}:{t_index}:{k}".encode())))
            for k in keys]
    return torch.stack(rows)


class ValidationSet:
    """The held-out rows, read from the worker's dataset once and then kept in memory (a small
    fraction of the cache), so that validating does not re-read the cache every time."""

    def __init__(self, shard, batch_size: int):
        self.shard, self.batch_size, self.batches = shard, batch_size, None

    def __iter__(self):
        if self.batches is None:
            self.batches = list(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy"))
        return iter(self.batches)


@torch.no_grad()
def validation_loss(model, val_set: ValidationSet, cfg: TrainConfig, device, text_encoder) -> float:
    """The p2-weighted noise MSE on every held-out row at each t of the grid, with fixed noise:
    deterministic, so two checkpoints are comparable. Every rank runs it (FSDP2 needs them all)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for raw in val_set:
        batch = to_tensors(raw, device)
        z_c, text = batch["stage_c_latents"], _text(batch, text_encoder)
        for i, t_value in enumerate(cfg.validation.t_grid):
            t = torch.full((z_c.shape[0],), float(t_value), device=device)
            noise = _noise_for(batch["key"], z_c.shape[1:], cfg.validation.seed, i).to(device)
            eps = model(add_noise(z_c, noise, t), t, text)
            total += float(weighted_mse(eps, noise, t, cfg.objective.p2_weighting)) * z_c.shape[0]
            count += z_c.shape[0]
    model.train(was_training)
    return total / max(count, 1)


# How long a "stall" fault waits for the test to kill the worker before failing by itself.
_STALL_SECONDS = 600


def validate(model, ema: Ema, val_set, cfg: TrainConfig, device, text_encoder) -> dict[str, float]:
    """The validation loss of the trained weights and, with an EMA, of the EMA weights (what a
    checkpoint's ema/ holds and what gets registered), named as in checkpoint.VAL_LOSS."""
    out = {ckpt_io.VAL_LOSS["model"]: validation_loss(model, val_set, cfg, device, text_encoder)}
    if ema.shadow:
        with ema.swapped_in(model):
            out[ckpt_io.VAL_LOSS["ema"]] = validation_loss(model, val_set, cfg, device, text_encoder)
    return out


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _maybe_fail(cfg: TrainConfig, step: int, rank: int) -> None:
    fault = cfg.fault
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

    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    ray.data.DataContext.get_current().enable_progress_bars = False  # the step lines below show progress
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + rank)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and (found := ckpt_io.incomplete(checkpoint)):
        # Ray's own record names its newest checkpoint, but a file of it is missing or cut short:
        # take the driver's pick instead (the newest complete one, see checkpoint.latest).
        if rank == 0:
            log.warning("checkpoint %s is incomplete (%s): resuming from %s instead", checkpoint.path, "; ".join(found),
                        config.get("resume_checkpoint") or "the start")
        checkpoint = None
    if checkpoint is None and config.get("resume_checkpoint"):
        from core.storage import resolve

        fs, _ = resolve(cfg.checkpoint.storage_path)
        checkpoint = ray.train.Checkpoint(path=config["resume_checkpoint"], filesystem=fs)
    folder_context = checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)
    with folder_context as folder:  # kept open until a sharded checkpoint is loaded
        restored = ckpt_io.read(Path(folder)) if folder else None
        sharded = bool(restored and restored["train_state"].get("sharded_world_size"))
        init_state = restored.get("model") if restored else config.get("init_state")
        model = build_model(cfg, init_state)
        ema = Ema(model, cfg.ema)
        if restored and "ema" in restored and ema.shadow and not sharded:
            ema.restore(restored["ema"])
        model = parallelize(model, cfg.parallel.strategy, device)
        ema.place_like(model)
        model.train()

        o = cfg.optim
        optimizer = torch.optim.AdamW(unwrap(model).parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o.warmup_steps))
        step = 0
        position = {"epoch": 0, "batch_in_epoch": 0}
        if restored:
            if sharded:
                ckpt_io.load_sharded(Path(folder), model, optimizer, ema.shadow)
            else:
                load_optimizer_state(model, optimizer, restored["optimizer"], cfg.parallel.strategy)
            step = restored["train_state"]["step"]
            position = restored["train_state"]["data_position"]
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(o.warmup_steps), last_epoch=step - 1)

    text_encoder = None
    if config["text_mode"] == "tokens":
        from latent_cache.encoders import build_text_encoder

        enc = cfg.encoders
        text_encoder = build_text_encoder(cfg.model.flavor, enc.text_encoder, enc.text_width).to(device)
    empty_text = torch.tensor(np.asarray(config["empty_text"], dtype=np.float32), device=device)[None]

    shard = ray.train.get_dataset_shard("train")
    train_batches = EqualStepBatches(
        _OneBatchShort(shard) if cfg.fault.short_rank == rank else shard, cfg.data.batch_size, device,
        skip_batches=position["batch_in_epoch"], epoch=position["epoch"],
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, rank=rank, order_log=cfg.data.order_log,
    )
    val_set = ValidationSet(ray.train.get_dataset_shard("val"), cfg.data.batch_size)
    logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    if restored:
        # What the resumed run starts from, for anyone checking that a resume loses nothing (a
        # gather every rank joins, once per resume).
        resumed_state = full_model_state(model)
        if logger is not None:
            from latent_cache.encoders import weights_digest

            logger.tag(f"resume.step_{step}.weights_sha256", weights_digest(stage_c_from(resumed_state, unwrap(model).config)))
            logger.skip_logged("loss")
    generator = torch.Generator()
    samples_per_step = cfg.data.batch_size * o.grad_accum * world

    while step < cfg.steps:
        step_start = time.perf_counter()
        # Seeded per step, not once per start: a step rerun after a restart draws the same t, noise,
        # caption dropout (generator) and dropout masks (torch's global RNG) as the first time, so
        # the rerun computes what the failed attempt logged (see MetricLogger.skip_logged).
        noise_seed, dropout_seed = np.random.SeedSequence([cfg.seed % 2**64, rank, step]).generate_state(2)
        generator.manual_seed(int(noise_seed))
        torch.manual_seed(int(dropout_seed))
        wait_before = train_batches.wait_seconds
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(o.grad_accum):
            batch = train_batches.next()
            sync = micro == o.grad_accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            context_manager = model.no_sync() if not sync else contextlib.nullcontext()
            with context_manager, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = stage_c_loss(model, batch["stage_c_latents"], _text(batch, text_encoder), empty_text, cfg.objective, generator)
                (loss / o.grad_accum).backward()
            loss_sum += float(loss) / o.grad_accum
        grad_norm = grad_norm_and_clip(model, o.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        ema.update(model, step, last=step == cfg.steps)
        _maybe_fail(cfg, step, rank)
        seconds = time.perf_counter() - step_start
        metrics = {
            "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "samples_per_s": samples_per_step / seconds,
            "data_wait_fraction": (train_batches.wait_seconds - wait_before) / seconds,
        }
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the loss is {loss_sum} at step {step}: stopping before the weights are ruined")
        validated = step % cfg.validation.every_steps == 0 or step == cfg.steps
        if validated:
            metrics.update(validate(model, ema, val_set, cfg, device, text_encoder))
        if logger is not None and (step % cfg.tracking.log_every == 0 or validated or step == cfg.steps):
            logger.log(metrics, step)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"step {step}/{cfg.steps}: {shown}", flush=True)  # Ray forwards it to the driver
        if step % cfg.checkpoint.every_steps == 0 or step == cfg.steps:
            _save_and_report(model, ema, optimizer, cfg, config, step, train_batches, metrics, rank)
    if logger is not None and not logger.flush():
        logger.flush()


def _save_and_report(model, ema, optimizer, cfg, config, step, batches, metrics, rank) -> None:
    import ray.train

    # Every rank joins the gathers (FSDP2), only rank 0 writes; every rank reports (a barrier).
    sharded = cfg.parallel.strategy == "fsdp2" and cfg.checkpoint.fsdp_state_dict == "sharded"
    model_state = None if sharded else full_model_state(model)
    ema_state = ema.full_state(model) if ema.shadow else None
    opt_state = None if sharded else optimizer_state(model, optimizer, cfg.parallel.strategy)
    report = {**metrics, "step": step}
    name = ckpt_io.checkpoint_name(step)
    with tempfile.TemporaryDirectory() as tmp:
        if sharded:
            ckpt_io.save_sharded(Path(tmp), model, optimizer, ema.shadow)
        if rank == 0:
            train_state = {
                "step": step,
                "data_position": {"epoch": batches.epoch, "batch_in_epoch": batches.batch_in_epoch},
                "mlflow_run_id": config["mlflow_run_id"],
                "cache_fingerprints": config["cache_fingerprints"],
                "config": config["train"],
                "sharded_world_size": ray.train.get_context().get_world_size() if sharded else None,
                # What the weights of this very checkpoint scored (register tags the version with it).
                "validation": {k: metrics[k] for k in ckpt_io.VAL_LOSS.values() if k in metrics},
            }
            ckpt_io.write(Path(tmp), unwrap(model).config, model_state, ema_state, opt_state, train_state)
        part = ray.train.Checkpoint.from_directory(tmp) if (rank == 0 or sharded) else None
        ray.train.report(report, checkpoint=part, checkpoint_dir_name=name)
