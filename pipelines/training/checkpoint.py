"""Training checkpoints: a folder per save, reported to Ray Train, which uploads it to the run's
storage (local or S3) and keeps the newest `num_to_keep`.

    checkpoint_<step>/
        model/   config.json + diffusion_pytorch_model.safetensors   the raw weights (diffusers layout)
        ema/     config.json + diffusion_pytorch_model.safetensors   the EMA weights (what gets registered)
                 (a LoRA fine-tune: model/ and ema/ hold pytorch_lora_weights.safetensors, the adapter
                 alone in diffusers' LoRA format, stages/lora.py; its base is the config's model.init)
        optimizer.pt         optimizer state (tensors and numbers only: read back with weights_only=True)
        train_state.json     step, data position, MLflow run id, cache fingerprints, the run's config,
                             the validation losses of model/ and ema/ when measured at this step,
                             and the size of every other file (a resume checks them: see `latest`)
    or, with FSDP2 and fsdp_state_dict "sharded", instead of model/ and optimizer.pt:
        sharded/             torch.distributed.checkpoint of model, optimizer and EMA, one file per rank
                             (every rank reports its part; Ray Train merges them into one folder)
"""

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import torch

from pipelines.training.config import MODEL_STAGES, CheckpointConfig
from stages.stage_b_with_compressor import StageBWithCompressor
from pipelines.training.parallel import unwrap
from stages import lora

TRAIN_STATE = "train_state.json"
# The validation loss of each weights folder's weights, by its metric name (MLflow, train_state).
VAL_LOSS = {"model": "val_loss_raw", "ema": "val_loss_ema"}
OPTIMIZER = "optimizer.pt"
SHARDED = "sharded"

log = logging.getLogger(__name__)


class IncompleteCheckpointError(FileNotFoundError):
    """A checkpoint folder whose files are missing or not of the size its train_state records (an
    upload cut short)."""


def model_class_of(model_config) -> type:
    """The model class (StageC, StageB, StageA, StageBWithCompressor) of a model config."""
    return next(cls for cls in (*MODEL_STAGES.values(), StageBWithCompressor) if isinstance(model_config, cls.config_class))


def saved_model_class(train_state: dict) -> type:
    """The class of the model a checkpoint holds, from the config it records (model.stage and
    model.train_semantic_compressor; a checkpoint written before Stage B training existed holds a Stage C)."""
    model = train_state.get("config", {}).get("model", {})
    return StageBWithCompressor if model.get("train_semantic_compressor") else MODEL_STAGES[model.get("stage", "c")]


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def write(
    directory: Path,
    model_config,
    model_state: dict[str, torch.Tensor] | None,
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    train_state: dict,
    lora_spec=None,
) -> Path:
    """Writes one checkpoint folder (rank 0, with states already gathered; model and optimizer are
    None when they went into the sharded part). `lora_spec`: the states are a LoRA adapter's."""
    directory = Path(directory)
    for name, state in (("model", model_state), ("ema", ema_state)):
        if state is None:
            continue
        if lora_spec is not None:
            lora.save(directory / name, lora.adapter_state(state), lora_spec, lora.prefix_of(model_class_of(model_config)))
            continue
        with torch.device("meta"):
            holder = model_class_of(model_config)(model_config)
        holder.load_state_dict(state, assign=True)
        holder.save_pretrained(directory / name)
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER)
    (directory / TRAIN_STATE).write_text(json.dumps({**train_state, "files": _local_sizes(directory)}, indent=2) + "\n")
    return directory


def _local_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def problems(state: dict, sizes: dict[str, int]) -> list[str]:
    """What is wrong with a checkpoint's files (`sizes`: every file found in its folder, by relative
    path) against its train_state; empty when it is complete. Sizes, not hashes: a cut-short upload
    shows in the size, and sizes come with the folder's listing (a hash would read every byte)."""
    recorded = state["files"]
    if isinstance(recorded, list):  # written before sizes were recorded: existence only
        recorded = dict.fromkeys(recorded)
    out = []
    for name, size in recorded.items():
        if name not in sizes:
            out.append(f"{name} is missing")
        elif size is not None and sizes[name] != size:
            out.append(f"{name} has {sizes[name]} bytes, not the {size} written")
    world = state.get("sharded_world_size")
    if world:  # the other ranks' shard files are not listed (rank 0 writes train_state): count them
        shards = sum(name.startswith(f"{SHARDED}/") and name.endswith(".distcp") for name in sizes)
        if shards < world:
            out.append(f"{SHARDED}/ has {shards} of {world} rank files")
    return out


def _model_options(model):
    """A LoRA-adapted model's sharded checkpoint holds its adapter only (the frozen base is model.init's)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    adapted = lora.is_adapted(model)
    return StateDictOptions(ignore_frozen_params=adapted, strict=not adapted)


def save_sharded(directory: Path, model, optimizer, ema_shadow: dict) -> None:
    """Every rank writes its shard of model, optimizer and EMA (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model, options=_model_options(model)),
             "optimizer": get_optimizer_state_dict(model, optimizer), "ema": ema_shadow}
    dcp.save(state, checkpoint_id=str(Path(directory) / SHARDED))


def load_sharded(directory: Path, model, optimizer, ema_shadow: dict) -> None:
    """Loads a sharded checkpoint into the parallelized model, its optimizer and the EMA, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = _model_options(model)
    state = {"model": get_model_state_dict(model, options=options), "optimizer": get_optimizer_state_dict(model, optimizer),
             "ema": ema_shadow}
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED))
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])


def read_train_state(directory: Path) -> dict:
    """The train_state of a checkpoint folder, after checking that every file it lists is there at
    the size it was written (else IncompleteCheckpointError: nothing of it may be loaded)."""
    directory = Path(directory)
    state = json.loads((directory / TRAIN_STATE).read_text())
    found = problems(state, _local_sizes(directory))
    if found:
        raise IncompleteCheckpointError(f"checkpoint {directory} is incomplete: {'; '.join(found)}")
    return state


def read(directory: Path) -> dict:
    """What a full checkpoint folder holds: train_state, and the model / ema / optimizer states
    (a sharded one: train_state and ema; the rest is loaded with `load_sharded`)."""
    directory = Path(directory)
    out = {"train_state": read_train_state(directory)}
    model_class = saved_model_class(out["train_state"])
    for name in ("model", "ema"):
        if (directory / name / lora.WEIGHTS_NAME).is_file():  # a LoRA fine-tune's adapter
            out[name] = lora.model_keys(lora.load(directory / name)[0])
        elif (directory / name).is_dir():
            out[name] = model_class.from_pretrained(directory / name).state_dict()
    if (directory / OPTIMIZER).is_file():
        out["optimizer"] = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    return out


def latest(checkpoints: CheckpointConfig):
    """The newest complete checkpoint of a run (`run_name` in `storage_path`) as a
    ray.train.Checkpoint, or None.

    Complete means its train_state.json is there and every file it lists is there at the size it
    was written; an incomplete one is skipped with a warning, for the one before it."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from core.storage import join

    fs, root = checkpoints.storage()
    run_dir = join(root, checkpoints.run_name)
    infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    candidates = sorted(
        (i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True
    )
    for path in candidates:
        checkpoint = Checkpoint(path=path, filesystem=fs)
        found = incomplete(checkpoint)
        if not found:
            return checkpoint
        log.warning("checkpoint %s is incomplete (%s): falling back to the one before it", path, "; ".join(found))
    return None


def train_state_of(checkpoint) -> dict:
    """The train_state of a ray.train.Checkpoint in its storage, read without downloading it."""
    from core.storage import join, read_text

    text = read_text(checkpoint.filesystem, join(checkpoint.path.rstrip("/"), TRAIN_STATE))
    if text is None:
        raise IncompleteCheckpointError(f"checkpoint {checkpoint.path} has no {TRAIN_STATE}")
    return json.loads(text)


def incomplete(checkpoint) -> list[str]:
    """What is wrong with a ray.train.Checkpoint in its storage, read from one listing of its
    folder (nothing downloaded); empty when it is complete."""
    import pyarrow.fs as pafs

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    try:
        state = train_state_of(checkpoint)
    except IncompleteCheckpointError:
        return [f"no {TRAIN_STATE}"]
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return problems(state, {i.path[len(path) + 1:]: i.size for i in listing if i.type == pafs.FileType.File})


class Checkpointer:
    """Restores a TrainState from the checkpoint to resume from, and saves it as a checkpoint
    reported to Ray Train. Every rank makes one and calls both (FSDP2 gathers and shards are
    collectives; every rank's report is a barrier); only rank 0 writes the full states."""

    def __init__(self, plan, rank: int, world: int):
        self.plan, self.rank, self.world = plan, rank, world
        cfg = plan.cfg
        self.sharded = cfg.parallel.strategy == "fsdp2" and cfg.checkpoint.fsdp_state_dict == "sharded"

    def restore(self, state) -> bool:
        """Loads into `state` the newest complete checkpoint of the run in its storage (see `latest`);
        False when there is none (a new run). On a restart after a failure that is usually the one
        Ray Train recorded, but a checkpoint written and reported just before a worker died can be
        complete in storage without Ray having recorded it: it is newer, and taken. Ray's record is
        not trusted either when a file of it is missing or cut short (skipped, for the one before)."""
        import ray.train

        recorded = ray.train.get_checkpoint()
        checkpoint = latest(self.plan.checkpoints)
        if self.rank == 0 and recorded is not None and (checkpoint is None or checkpoint.path.rstrip("/") != recorded.path.rstrip("/")):
            log.warning("Ray Train's newest checkpoint is %s; restoring the newest complete one in storage instead: %s",
                        recorded.path, checkpoint.path if checkpoint is not None else "none, from the start")
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as folder:  # kept open until a sharded checkpoint is loaded
            restored = read(Path(folder))
            saved = restored.pop("train_state")
            if saved.get("sharded_world_size"):
                load_sharded(Path(folder), state.model, state.optimizer, state.ema.shadow)
                restored.pop("ema", None)  # the shards hold the EMA as it was laid out (ema/ is for consumers)
            state.load_state_dict({**restored, "step": saved["step"], "data_position": saved["data_position"]})
        return True

    def save(self, state, metrics: dict[str, float]) -> None:
        """Saves `state` as checkpoint_<step> and reports it with `metrics` to Ray Train."""
        import ray.train

        full = state.state_dict(sharded=self.sharded)
        with tempfile.TemporaryDirectory() as tmp:
            if self.sharded:
                save_sharded(Path(tmp), state.model, state.optimizer, state.ema.shadow)
            if self.rank == 0:
                train_state = {
                    "step": full["step"],
                    "data_position": full["data_position"],
                    "mlflow_run_id": self.plan.mlflow_run_id,
                    "cache_fingerprints": self.plan.cache_fingerprints,
                    "config": dataclasses.asdict(self.plan.cfg),
                    "sharded_world_size": self.world if self.sharded else None,
                    "lora_base": self.plan.lora_base,  # a LoRA's checkpoint holds the adapter of this base
                    # What the weights of this very checkpoint scored (register tags the version with it).
                    "validation": {k: v for k, v in metrics.items() if k.startswith("val_")},
                }
                lora_config = self.plan.cfg.model.lora
                write(Path(tmp), unwrap(state.model).config, full["model"], full["ema"], full["optimizer"], train_state,
                      lora_spec=lora_config.spec() if lora_config is not None else None)
            part = ray.train.Checkpoint.from_directory(tmp) if (self.rank == 0 or self.sharded) else None
            ray.train.report({**metrics, "step": full["step"]}, checkpoint=part, checkpoint_dir_name=checkpoint_name(full["step"]))
