"""What the driver hands every training worker (the TorchTrainer's train_loop_config): one typed,
picklable plan, decided once on the driver, so that no worker rebuilds or re-decides any of it."""

import dataclasses

from pipelines.training.config import CheckpointConfig, TrainConfig
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
    # cfg.checkpoint with its storage path resolved on the driver (a relative local path would name
    # another folder in a worker): where every worker looks for the checkpoint to resume from.
    checkpoints: CheckpointConfig | None = None
    # Whether each worker holds its share of the training rows in memory (decided on the driver from
    # data.memory_limit_mb and the cache's row size: see EqualStepBatches).
    in_memory: bool = False
    # A LoRA run's base ({"init": model.init, "sha256": of its weights}), written into every checkpoint.
    lora_base: dict | None = None
    # A cache of several aspect-ratio buckets: bucket -> {"rows" (training rows per worker), "trained",
    # "in_memory", "probe" (Stage C's retrieval rows of the bucket)}; its datasets are train_<bucket>
    # (the trained ones) and val_<bucket>. None: one bucket, datasets train and val.
    buckets: dict[str, dict] | None = None
    # The cache's absolute URL when each worker reads its rows, its training share and the held-out
    # rows, from the cache's files (a small cache: see train.reads_in_process and rows.worker_rows);
    # None: from the Ray Datasets train / val (train_<bucket> / val_<bucket>).
    cache_in_process: str | None = None

    def __post_init__(self):
        from core.storage import absolute

        if self.checkpoints is None:
            self.checkpoints = dataclasses.replace(self.cfg.checkpoint, storage_path=absolute(self.cfg.checkpoint.storage_path))
