"""What the driver hands every training worker (the TorchTrainer's train_loop_config): one typed,
picklable plan, decided once on the driver, so that no worker rebuilds or re-decides any of it."""

import dataclasses

from pipelines.training.config import TrainConfig
from pipelines.training.tasks import StageATask, StageBTask, StageCTask


@dataclasses.dataclass
class TrainPlan:
    cfg: TrainConfig
    task: StageCTask | StageBTask | StageATask
    tracking_uri: str  # resolved on the driver: a worker has another working directory and environment
    mlflow_run_id: str
    cache_fingerprints: dict[str, str]  # of the cache's encoders, recorded in every checkpoint
    # The weights to start from (None: random init); only for a new run, a resume loads its checkpoint
    # (every worker finds the run's newest complete one in storage: see Checkpointer.restore).
    init_state: dict | None = None
