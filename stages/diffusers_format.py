"""The diffusers folder format: `config.json` (diffusers' parameter names) next to
`diffusion_pytorch_model.safetensors`, in a local folder or a hub repository's subfolder.

A folder written here is what diffusers' Würstchen classes and pipelines read, and a folder diffusers
wrote loads here without renaming. The models never know which format they came from.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from stages.state_dicts import load_state_dict_strict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
BIN_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
# The diffusers release whose loaders the parity tests check our folders against.
DIFFUSERS_VERSION = "0.42.1"


def config_to_dict(model: Any) -> dict[str, Any]:
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}
    return {"_class_name": model.diffusers_class_name, "_diffusers_version": DIFFUSERS_VERSION, **values}


def config_from_dict(cls: Any, values: dict[str, Any], source: str) -> Any:
    """Builds `cls.config_class` from a diffusers config dict; keys it leaves out take diffusers'
    class defaults, as diffusers itself would."""
    class_name = values.get("_class_name")
    if class_name is not None and class_name != cls.diffusers_class_name:
        raise ValueError(
            f"{source} describes a {class_name}, but {cls.__name__} loads a {cls.diffusers_class_name}; "
            f"point at the right model folder (or subfolder)"
        )
    params = {k: v for k, v in values.items() if not k.startswith("_")}
    known = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{source} has config keys {cls.__name__} does not know: {unknown}; known keys: {sorted(known)}")
    return cls.config_class(**{**cls.diffusers_defaults, **params})


def _write_atomically(path: Path, write) -> None:
    # Write beside the target and rename, so an interrupted save never leaves a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_folder(model: Any, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous().cpu()
    _write_atomically(
        directory / WEIGHTS_NAME, lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"})
    )
    text = json.dumps(config_to_dict(model), indent=2, sort_keys=True) + "\n"
    _write_atomically(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _download(repo_id: str, subfolder: str | None, default_subfolder: str | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = []
    for sub in [subfolder] if subfolder else ["", default_subfolder or ""]:
        prefix = f"{sub}/" if sub else ""
        patterns += [prefix + CONFIG_NAME, prefix + "diffusion_pytorch_model*.safetensors", prefix + WEIGHTS_INDEX_NAME]
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types; all mean "could not fetch"
        raise FileNotFoundError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Without network access, download it elsewhere and pass the local folder instead."
        ) from err


def resolve_folder(
    cls: Any, path_or_hub_id: str | Path, subfolder: str | None = None, revision: str | None = None
) -> Path:
    """The folder that holds config.json, from a local path or a hub id (plus subfolder)."""
    name = str(path_or_hub_id)
    base = Path(name).expanduser()
    if not base.exists():
        if not looks_like_hub_id(name):
            raise FileNotFoundError(f"{name!r} is neither an existing folder nor a hub id of the form 'org/name'")
        base = _download(name, subfolder, cls.default_subfolder, revision)
    if not base.is_dir():
        raise NotADirectoryError(f"{name!r} is a file; {cls.__name__}.from_pretrained takes a model folder")
    candidates = [base / subfolder] if subfolder else [base] + ([base / cls.default_subfolder] if cls.default_subfolder else [])
    for folder in candidates:
        if (folder / CONFIG_NAME).is_file():
            return folder
    tried = ", ".join(str(c / CONFIG_NAME) for c in candidates)
    raise FileNotFoundError(f"no {CONFIG_NAME} for {cls.__name__} in {name!r} (looked for {tried})")


def load_weights(folder: Path, variant: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a folder and a description of where it came from."""

    def named(filename: str) -> Path:
        if variant:
            stem, ext = filename.split(".", 1)
            filename = f"{stem}.{variant}.{ext}"
        return folder / filename

    single, index, binary = named(WEIGHTS_NAME), named(WEIGHTS_INDEX_NAME), named(BIN_WEIGHTS_NAME)
    if single.is_file():
        return safetensors.torch.load_file(single), str(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(safetensors.torch.load_file(folder / shard))
        return state, str(index)
    if binary.is_file():
        # Legacy pickled weights: never unpickle arbitrary objects from a downloaded file.
        return torch.load(binary, map_location="cpu", weights_only=True), str(binary)
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"no weights in {folder}: expected {single.name} (or a sharded index); found {present}")


def load_folder(
    cls: Any,
    path_or_hub_id: str | Path,
    subfolder: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    variant: str | None = None,
) -> Any:
    folder = resolve_folder(cls, path_or_hub_id, subfolder, revision)
    config_path = folder / CONFIG_NAME
    config = config_from_dict(cls, json.loads(config_path.read_text()), str(config_path))
    state, source = load_weights(folder, variant)
    # Build without allocating (the v2 prior is 4 GB in fp32), then take the loaded tensors.
    with torch.device("meta"):
        model = cls(config)
    load_state_dict_strict(model, state, source, dtype=dtype or torch.float32, device=device)
    return model.eval()
