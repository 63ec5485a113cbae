"""Models-from-code entry of the registered Stage C model (see pipelines/pyfunc_models.py)."""

import mlflow

from pipelines.pyfunc_models import StageCModel

mlflow.models.set_model(StageCModel())
