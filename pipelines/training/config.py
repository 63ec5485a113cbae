"""What a training run is told. Read from YAML by `pipelines/config.py`; every field has a default
that trains the `small` Stage C on the bundled Twemoji cache on two CPU workers."""

import dataclasses
from typing import Any

from data_prep.config import EncoderWeights
from stages.objectives import StageCObjective

STRATEGIES = ("ddp", "fsdp2")
EMA_MODES = ("none", "every_step", "original")


@dataclasses.dataclass
class ModelConfig:
    flavor: str = "small"
    # None: from scratch; a diffusers-format folder or hub id (e.g. warp-ai/wuerstchen-prior); or an
    # MLflow model URI such as models:/wuerstchen-stage-c@champion
    init: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # StageCConfig fields
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class EncodersConfig:
    """The encoders the model was (or will be) trained with. Their fingerprints must equal the
    cache's, or the run is refused before any worker starts."""

    semantic: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    text_encoder: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    text_width: int | None = None


@dataclasses.dataclass
class DataConfig:
    cache: str = "runs/cache/twemoji"
    validation_fraction: float = 0.05  # held out by a hash of the key: the same rows in every run
    batch_size: int = 32  # per worker and micro-step
    # Fine-tuning on new data: train on the rows of these source shards only, plus `replay_fraction`
    # of the other rows (None: every row). Validation always covers the whole cache's held-out rows.
    shards: list[str] | None = None
    replay_fraction: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise ValueError(f"data.replay_fraction must be in [0, 1], got {self.replay_fraction}")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup, then constant (the original recipe uses 10,000)
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclasses.dataclass
class EmaConfig:
    # "every_step": ema = decay * ema + (1 - decay) * weights after every optimizer step.
    # "original": the Würstchen recipe: a plain copy every `every` steps until `copy_until`, then
    # every `every` steps (and at the last step) ema = beta * ema + (1 - beta) * weights. Steps
    # count from the run's start; copy_until must be below `steps` (else it never averages).
    mode: str = "every_step"
    decay: float = 0.999
    every: int = 100
    beta: float = 0.9
    copy_until: int = 5000

    def __post_init__(self):
        if self.mode not in EMA_MODES:
            raise ValueError(f"ema.mode must be one of {EMA_MODES}, got {self.mode!r}")


@dataclasses.dataclass
class ValidationConfig:
    every_steps: int = 100
    t_grid: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # every held-out sample at each of these t
    seed: int = 0  # the fixed noise


@dataclasses.dataclass
class CheckpointConfig:
    storage_path: str = "runs/train"  # local path or s3://bucket/prefix
    run_name: str = "stage-c-small"  # rerunning with the same name resumes from its latest checkpoint
    every_steps: int = 100
    num_to_keep: int = 2
    # FSDP2 only: "full" gathers the model and optimizer state to rank 0; "sharded" has every rank
    # write its own shard with torch.distributed.checkpoint (no gather; the EMA is still gathered,
    # written in the diffusers layout for consumers).
    fsdp_state_dict: str = "full"

    def __post_init__(self):
        if self.fsdp_state_dict not in ("full", "sharded"):
            raise ValueError(f"checkpoint.fsdp_state_dict must be 'full' or 'sharded', got {self.fsdp_state_dict!r}")


@dataclasses.dataclass
class ParallelConfig:
    strategy: str = "ddp"  # or "fsdp2"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # leave CPUs for Ray Data ingest: workers that hold every CPU starve it

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclasses.dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else an sqlite store under runs/
    experiment: str = "wuerstchen-stage-c"
    log_every: int = 10


@dataclasses.dataclass
class FaultConfig:
    """Test-only: make one worker fail once at a step, to exercise recovery."""

    fail_at_step: int | None = None
    rank: int = 1
    marker: str | None = None  # a file whose existence means "already failed once"


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    encoders: EncodersConfig = dataclasses.field(default_factory=EncodersConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: StageCObjective = dataclasses.field(default_factory=StageCObjective)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    steps: int = 200
    seed: int = 0
    max_failures: int = 0
    ray_address: str | None = None
    num_cpus: int | None = None  # for a local cluster only

    def __post_init__(self):
        # The step count is the run's own (a fine-tune starts at 0): a copy phase as long as the run
        # leaves an "EMA" that is the raw weights. The last step is always an update (see Ema.update).
        if self.ema.mode == "original" and self.ema.copy_until >= self.steps:
            raise ValueError(
                f"ema.copy_until={self.ema.copy_until} is not below steps={self.steps}: the original EMA schedule would only "
                f"copy the weights and never average them; set ema.copy_until below steps (0 for a fine-tune, whose "
                f"starting weights are already trained) or use ema.mode=every_step"
            )
