"""The MLflow model registry as this project uses it: names, aliases, version tags, and reading a
registered version back (`models:/NAME@alias` or `models:/NAME/VERSION`).

Aliases: `challenger` is the newest registered candidate awaiting the gate; `champion` is what
consumers load. Every decision is written as tags on the version it concerns; the registered model
keeps the list of champions (`champion_history`) so that a rollback knows where to go back to.
"""

import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

import yaml

from stages import StageC

STAGE_C_MODEL = "wuerstchen-stage-c"
DECODERS_MODEL = "wuerstchen-decoders"
CHAMPION = "champion"
CHALLENGER = "challenger"
SOURCE_TAG = "wuerstchen.source"  # what a version was made from: registering it twice gives the same version
# A Stage C version's latent space (stages.latents.LATENT_SPACES); absent: "v2". Losses of two spaces don't compare.
LATENT_SPACE_TAG = "latent_space"
HISTORY_TAG = "champion_history"  # on the registered model: JSON list of champion versions, oldest first

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def client(tracking_uri: str | None = None):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.training.tracking import tracking_uri as default_uri

    uri = default_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def code_version() -> str:
    """The package version, plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("wuerstchen-pipeline")
    except PackageNotFoundError:
        text = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{text}+g{commit}" if commit else text


def cache_fingerprint(manifest: dict) -> str:
    """One hash of what a cache holds: its encoders, shapes and committed files."""
    body = {
        "encoders": {k: v["fingerprint"] for k, v in manifest["encoders"].items()},
        "shapes": manifest["shapes"],
        "files": [(f["path"], f["rows"]) for f in manifest["files"]],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    match = _URI.match(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a registered model URI of the form models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def resolve_version(mlflow_client, uri: str):
    """The ModelVersion a registered model URI points at (an alias is resolved now)."""
    name, alias, version = parse_model_uri(uri)
    if alias is not None:
        return mlflow_client.get_model_version_by_alias(name, alias)
    return mlflow_client.get_model_version(name, version)


def version_by_alias(mlflow_client, name: str, alias: str):
    """The version holding `alias`, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def versions(mlflow_client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    return sorted(found, key=lambda v: int(v.version))


def find_version(mlflow_client, name: str, tag: str, value: str):
    """The oldest version of `name` whose tag `tag` equals `value`, or None."""
    return next((v for v in versions(mlflow_client, name) if v.tags.get(tag) == value), None)


def champion_history(mlflow_client, name: str) -> list[str]:
    model = mlflow_client.get_registered_model(name)
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def set_champion(mlflow_client, name: str, version: str, history: list[str]) -> None:
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    mlflow_client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def download(model_uri: str, dst: str | Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def model_config(folder: Path) -> dict:
    """The pyfunc model_config stored in a downloaded model's MLmodel file."""
    mlmodel = yaml.safe_load((Path(folder) / "MLmodel").read_text())
    return mlmodel["flavors"]["python_function"].get("config") or {}


def model_config_of(model_uri: str) -> dict:
    """The pyfunc model_config of a registered version, reading only its MLmodel file."""
    import mlflow

    return mlflow.models.get_model_info(model_uri).flavors["python_function"].get("config") or {}


def find_model_folder(root: Path, model_class=StageC) -> Path:
    """The diffusers-layout folder of a `model_class` (StageC, StageB, StageA) inside downloaded model
    artifacts (a Stage C version holds its prior; a decoder bundle its Stage B and Stage A)."""
    for config in sorted(root.rglob("config.json")):
        try:
            if json.loads(config.read_text()).get("_class_name") == model_class.diffusers_class_name:
                return config.parent
        except ValueError:
            continue
    raise FileNotFoundError(f"no {model_class.__name__} ({model_class.diffusers_class_name}) folder in the model artifacts under {root}")


def find_prior_folder(root: Path) -> Path:
    """The diffusers-layout Stage C folder inside downloaded model artifacts."""
    return find_model_folder(root, StageC)


def load_registered(model_uri: str, model_class=StageC, tracking_uri: str | None = None):
    """The weights of `model_class` in a registered model version: the prior of a Stage C version,
    or the Stage B or Stage A of a decoder bundle."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        root = download(model_uri, tmp)
        if model_class is StageC:  # a Stage C version may be a LoRA adapter on another version
            return stage_c_in(root)
        return model_class.from_pretrained(find_model_folder(root, model_class))


def stage_c_in(folder: Path, config: dict | None = None) -> StageC:
    """The Stage C of a downloaded Stage C version (or of its prior artifact, with the version's
    model `config`): its prior, or for a LoRA version its pinned base with its adapter merged in."""
    base = (config if config is not None else model_config(folder)).get("lora_base")
    return with_adapter(load_stage_c(base), folder) if base else StageC.from_pretrained(find_prior_folder(folder))


def with_adapter(model, root: Path):
    """`model` (the base) with the LoRA adapter found under `root` merged into its weights, in place."""
    from stages import lora

    files = sorted(Path(root).rglob(lora.WEIGHTS_NAME))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one LoRA adapter ({lora.WEIGHTS_NAME}) in the model artifacts under {root}, found {len(files)}")
    adapter, spec, _ = lora.load(files[0].parent)
    return lora.merge_into(model, adapter, spec)


def load_stage_c(model_uri: str, tracking_uri: str | None = None) -> StageC:
    """The Stage C weights of a registered model version."""
    return load_registered(model_uri, StageC, tracking_uri)


def latent_space_of(config: dict) -> str:
    """The latent space a registered prior diffuses in, from its model config (versions registered
    before priors had a choice are in the v2 space)."""
    return config.get("latent_space", "v2")
