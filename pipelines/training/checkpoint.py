"""Training checkpoints: a folder per save, reported to Ray Train, which uploads it to the run's
storage (local or S3) and keeps the newest `num_to_keep`.

    checkpoint_<step>/
        model/   config.json + diffusion_pytorch_model.safetensors   the raw weights (diffusers layout)
        ema/     config.json + diffusion_pytorch_model.safetensors   the EMA weights (what gets registered)
        optimizer.pt         optimizer state (tensors and numbers only: read back with weights_only=True)
        train_state.json     step, data position, MLflow run id, cache fingerprints, the run's config
    or, with FSDP2 and fsdp_state_dict "sharded", instead of model/ and optimizer.pt:
        sharded/             torch.distributed.checkpoint of model, optimizer and EMA, one file per rank
                             (every rank reports its part; Ray Train merges them into one folder)
"""

import json
from pathlib import Path

import torch

from stages import StageC

TRAIN_STATE = "train_state.json"
OPTIMIZER = "optimizer.pt"
SHARDED = "sharded"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def write(
    directory: Path,
    model_config,
    model_state: dict[str, torch.Tensor] | None,
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    train_state: dict,
) -> Path:
    """Writes one checkpoint folder (rank 0, with states already gathered; model and optimizer are
    None when they went into the sharded part)."""
    directory = Path(directory)
    for name, state in (("model", model_state), ("ema", ema_state)):
        if state is None:
            continue
        with torch.device("meta"):
            holder = StageC(model_config)
        holder.load_state_dict(state, assign=True)
        holder.save_pretrained(directory / name)
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    (directory / TRAIN_STATE).write_text(json.dumps({**train_state, "files": files}, indent=2) + "\n")
    return directory


def save_sharded(directory: Path, model, optimizer, ema_shadow: dict) -> None:
    """Every rank writes its shard of model, optimizer and EMA (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer), "ema": ema_shadow}
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

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer), "ema": ema_shadow}
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])


def read_train_state(directory: Path) -> dict:
    directory = Path(directory)
    state = json.loads((directory / TRAIN_STATE).read_text())
    missing = [f for f in state["files"] if not (directory / f).is_file()]
    if state.get("sharded_world_size"):
        shards = list((directory / SHARDED).glob("*.distcp"))
        if len(shards) < state["sharded_world_size"]:
            missing.append(f"{SHARDED}/ ({len(shards)} of {state['sharded_world_size']} rank files)")
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing {missing}")
    return state


def read(directory: Path) -> dict:
    """What a full checkpoint folder holds: train_state, and the model / ema / optimizer states
    (a sharded one: train_state and ema; the rest is loaded with `load_sharded`)."""
    directory = Path(directory)
    out = {"train_state": read_train_state(directory)}
    if (directory / "model").is_dir():
        out["model"] = StageC.from_pretrained(directory / "model").state_dict()
    if (directory / "ema").is_dir():
        out["ema"] = StageC.from_pretrained(directory / "ema").state_dict()
    if (directory / OPTIMIZER).is_file():
        out["optimizer"] = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
    return out


def latest(storage_path: str, run_name: str):
    """The newest complete checkpoint of a run in its storage (a ray.train.Checkpoint), or None.

    Complete means its train_state.json is there, written last, and every file it lists exists."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from data_prep.cache import join, read_text, resolve

    fs, root = resolve(storage_path)
    run_dir = join(root, run_name)
    infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    candidates = sorted(
        (i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True
    )
    for path in candidates:
        text = read_text(fs, join(path, TRAIN_STATE))
        if text is None:
            continue
        state = json.loads(text)
        complete = all(fs.get_file_info(join(path, f)).type == pafs.FileType.File for f in state["files"])
        if state.get("sharded_world_size"):
            shards = fs.get_file_info(pafs.FileSelector(join(path, SHARDED), allow_not_found=True))
            complete &= sum(i.path.endswith(".distcp") for i in shards) >= state["sharded_world_size"]
        if complete:
            return Checkpoint(path=path, filesystem=fs)
    return None
