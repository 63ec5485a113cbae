"""What the driver hands every training worker (the TorchTrainer's train_loop_config): one typed,
picklable plan, decided once on the driver, so that no worker rebuilds or re-decides any of it."""

import dataclasses

from pipelines.training.config import TrainConfig
from pipelines.training.tasks import StageBTask, StageCTask


@dataclasses.dataclass
class TrainPlan:
    cfg: TrainConfig
    task: StageCTask | StageBTask
    tracking_uri: str  # resolved on the driver: a worker has another working directory and environment
    mlflow_run_id: str
    cache_fingerprints: dict[str, str]  # of the cache's encoders, recorded in every checkpoint
    # The weights to start from (None: random init); only for a new run, a resume loads its checkpoint.
    init_state: dict | None = None
    # The newest complete checkpoint of the run when this trainer starts (the driver's pick, see
    # checkpoint.latest): Ray Train V2 restores a run it is still tracking by itself (get_checkpoint),
    # but a finished or killed run rerun as a new trainer starts from here (resume_from_checkpoint is gone).
    resume_checkpoint: str | None = None
