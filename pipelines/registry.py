"""Reading models back from the MLflow model registry (`models:/NAME@alias` or `models:/NAME/VERSION`)."""

import json
import tempfile
from pathlib import Path

from stages import StageC


def find_prior_folder(root: Path) -> Path:
    """The diffusers-layout Stage C folder inside downloaded model artifacts."""
    for config in sorted(root.rglob("config.json")):
        try:
            if json.loads(config.read_text()).get("_class_name") == StageC.diffusers_class_name:
                return config.parent
        except ValueError:
            continue
    raise FileNotFoundError(f"no Stage C ({StageC.diffusers_class_name}) folder in the model artifacts under {root}")


def load_stage_c(model_uri: str, tracking_uri: str | None = None) -> StageC:
    """The Stage C weights of a registered model version."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        return StageC.from_pretrained(find_prior_folder(local))
