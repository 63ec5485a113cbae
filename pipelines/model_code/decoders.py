"""Models-from-code entry of the registered decoder bundle (see pipelines/pyfunc_models.py)."""

import mlflow

from pipelines.pyfunc_models import DecoderModel

mlflow.models.set_model(DecoderModel())
