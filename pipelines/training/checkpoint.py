"""Training checkpoints: a folder per save, reported to Ray Train, which uploads it to the run's
storage (local or S3) and keeps the newest `num_to_keep`.

    checkpoint_<step>/
        model/   config.json + diffusion_pytorch_model.safetensors   the raw weights (diffusers layout)
        ema/     config.json + diffusion_pytorch_model.safetensors   the EMA weights (what gets registered)
        optimizer.pt         optimizer state (tensors and numbers only: read back with weights_only=True)
        train_state.json     step, data position, MLflow run id, cache fingerprints, the run's config
"""

import json
from pathlib import Path

import torch

from stages import StageC

TRAIN_STATE = "train_state.json"
OPTIMIZER = "optimizer.pt"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def write(
    directory: Path,
    model_config,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict,
    train_state: dict,
) -> Path:
    """Writes one checkpoint folder (rank 0, with states already gathered)."""
    directory = Path(directory)
    for name, state in (("model", model_state), ("ema", ema_state)):
        if state is None:
            continue
        with torch.device("meta"):
            holder = StageC(model_config)
        holder.load_state_dict(state, assign=True)
        holder.save_pretrained(directory / name)
    torch.save(optimizer_state, directory / OPTIMIZER)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    (directory / TRAIN_STATE).write_text(json.dumps({**train_state, "files": files}, indent=2) + "\n")
    return directory


def read(directory: Path) -> dict:
    """What a checkpoint folder holds: train_state, and the model / ema / optimizer states."""
    directory = Path(directory)
    state = json.loads((directory / TRAIN_STATE).read_text())
    missing = [f for f in state["files"] if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {directory} is incomplete: missing {missing}")
    out = {"train_state": state, "model": StageC.from_pretrained(directory / "model").state_dict()}
    if (directory / "ema").is_dir():
        out["ema"] = StageC.from_pretrained(directory / "ema").state_dict()
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
        listed = json.loads(text)["files"]
        if all(fs.get_file_info(join(path, f)).type == pafs.FileType.File for f in listed):
            return Checkpoint(path=path, filesystem=fs)
    return None
