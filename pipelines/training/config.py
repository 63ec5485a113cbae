"""What a training run is told. Read from YAML by `core/config.py`; every field has a default
that trains the `small` Stage C on the bundled Twemoji cache on two CPU workers."""

import dataclasses
from typing import Annotated, Any

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, TypeAdapter, ValidationError

from latent_cache.spec import EncoderWeights
from pipelines.training.regions import ACTIVATION_CHECKPOINTING
from core.config import HeldOutFraction, NoiseLevels, Probability, config_dataclass, describe
from stages.lora import LORA_TARGETS, LoraSpec, add_lora
from stages.objectives import StageAObjective, StageBObjective, StageCObjective
from stages.stage_a import StageA
from stages.stage_b import StageB
from stages.stage_b_with_compressor import StageBWithCompressor
from stages.stage_c import StageC, StageCConfig

STRATEGIES = ("ddp", "fsdp2")
# parallel.precision: "auto" is bf16 on CUDA, fp32 on CPU.
PRECISIONS = ("auto", "bf16", "fp32")
EMA_MODES = ("none", "every_step", "original")
AdamBeta = Annotated[float, Field(ge=0.0, lt=1.0)]  # a moment's decay: at 1 it would never forget
FAULT_ACTIONS = ("raise", "stall")


@config_dataclass
class LoraConfig:
    """A LoRA fine-tune (stages/lora.py, through peft): the base (model.init) frozen, an adapter of this
    rank on these modules of every attention trained alone. The defaults are diffusers' LoRA prior
    recipe (train_text_to_image_lora_prior.py): rank 4, alpha = rank, the query, key, value and
    output projections, no dropout."""

    rank: PositiveInt = 4
    alpha: PositiveFloat | None = None  # None: the rank (a scale alpha / rank of 1)
    dropout: Probability = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))

    def spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=float(self.alpha if self.alpha is not None else self.rank),
                        dropout=self.dropout, target_modules=tuple(self.target_modules))


# model.stage -> the model trained: "c" the text-conditional prior, "b" the diffusion decoder, "a"
# the VQGAN (on the cache's images)
MODEL_STAGES = {"c": StageC, "b": StageB, "a": StageA}


@config_dataclass
class ModelConfig:
    # "c": Stage C (the prior, on z_C and the text); "b": Stage B (the decoder, on Stage A latents);
    # "a": Stage A (the VQGAN, on the cache's images)
    stage: str = "c"
    flavor: str = "small"
    # None: from scratch; a diffusers-format folder or hub id (e.g. warp-ai/wuerstchen-prior, or
    # warp-ai/wuerstchen for Stage B or A: its decoder/ or vqgan/ subfolder); an original .pt
    # checkpoint; or a registered model: models:/wuerstchen-stage-c@champion (Stage C), or a decoder
    # bundle such as models:/wuerstchen-decoders/2 (Stage B: its decoder; Stage A: its VQGAN)
    init: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # fields of the stage's config (StageCConfig, StageBConfig)
    # Recompute each repeated block's activations in backward (pipelines/training/regions.py): "none";
    # "selective" keeps the outputs of matrix products and attention, recomputes the elementwise ops;
    # "full" keeps only each block's input (the least memory, a second forward's time).
    activation_checkpointing: str = "none"
    # Regional torch.compile: each repeated block compiled on its own (a minute or two of compiling
    # at the start of a run; on CUDA, fused elementwise chains and fewer kernel launches).
    compile: bool = False
    # Stage B only: train the semantic compressor together with it (from encoders.semantic's
    # weights), on the cache's semantic_images instead of its cached semantic latents. Its weights
    # then go with the decoders, and the prior's cache must be made with them.
    train_semantic_compressor: bool = False
    # A LoRA fine-tune of model.init (Stage C or Stage B): only the adapter trains, is checkpointed
    # and registered (pinned to its base). None: every weight trains.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.stage not in MODEL_STAGES:
            raise ValueError(f"model.stage must be one of {sorted(MODEL_STAGES)}, got {self.stage!r}")
        if self.train_semantic_compressor and self.stage != "b":
            raise ValueError(f"model.train_semantic_compressor is for Stage B (the decoder it conditions); model.stage is {self.stage!r}")
        if self.lora is not None:
            if self.stage not in ("c", "b") or self.train_semantic_compressor:
                raise ValueError(f"model.lora adapts the attention of Stage C or Stage B; model.stage is {self.stage!r}"
                                 + (" with train_semantic_compressor" if self.train_semantic_compressor else ""))
            if not self.init:
                raise ValueError("model.lora adapts trained weights: model.init must name them (a LoRA on a random init learns nothing useful)")
        model_class = self.model_class
        if self.flavor not in model_class.flavors:
            raise ValueError(f"model.flavor must be one of {sorted(model_class.flavors)}, got {self.flavor!r}")
        config_class = MODEL_STAGES[self.stage].config_class  # the overrides are the stage's own
        known = [f.name for f in dataclasses.fields(config_class)]
        unknown = sorted(set(self.overrides) - set(known))
        if unknown:
            raise ValueError(f"model.overrides: unknown Stage {self.stage.upper()} fields {unknown}; known: {known}")
        # The values get the config's own types (a YAML "0.1" is the float 0.1), checked by pydantic.
        try:
            typed = TypeAdapter(config_class).validate_python(self.overrides)
        except ValidationError as err:
            raise ValueError(describe(err, "model.overrides")) from None
        self.overrides = {name: getattr(typed, name) for name in self.overrides}
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"model.activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, "
                             f"got {self.activation_checkpointing!r}")

    @property
    def model_class(self):
        return StageBWithCompressor if self.train_semantic_compressor else MODEL_STAGES[self.stage]

    def stage_b_config(self):
        """The config of the Stage B trained (alone, or with the compressor)."""
        config = self.model_config()
        return config.stage_b if self.train_semantic_compressor else config

    def model_config(self):
        """The flavor's config with the overrides: the one place the trained model's shape is decided."""
        return self.model_class.flavor_config(self.flavor, **self.overrides)

    def stage_c_config(self) -> StageCConfig:
        if self.stage != "c":
            raise ValueError(f"model.stage is {self.stage!r}: this model is not a Stage C")
        return self.model_config()

    def build(self, init_state: dict | None = None):
        """The model to train: random init (the caller seeds torch), or `init_state` loaded. Stage B
        with its compressor always starts from a compressor's weights; its Stage B keeps the random
        init when `init_state` holds none of it. With model.lora, the adapter is added on top of the
        loaded base (which it freezes). Checkpointing and compile are applied by the trainer
        (TrainState.build)."""
        model = self.model_class(self.model_config())
        if init_state is not None:
            missing, unexpected = model.load_state_dict(init_state, strict=False)
            fresh = (self.train_semantic_compressor and not any(k.startswith("stage_b.") for k in init_state)
                     and all(k.startswith("stage_b.") for k in missing))
            if unexpected or (missing and not fresh):
                model.load_state_dict(init_state)  # raises, naming the keys
        if self.lora is not None:
            add_lora(model, self.lora.spec())
        return model


@config_dataclass
class EncodersConfig:
    """The encoders the model was (or will be) trained with. Their fingerprints must equal the
    cache's, or the run is refused before any worker starts."""

    semantic: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    text_encoder: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    text_width: PositiveInt | None = None
    # Stage B's: the Stage A whose latents it learns and the decoder's text encoder (prep's
    # encode.stage_a and encode.decoder_text_encoder).
    stage_a: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    decoder_text_encoder: EncoderWeights = dataclasses.field(default_factory=EncoderWeights)
    decoder_text_width: PositiveInt | None = None

    # Named build_*: `text_encoder` and `semantic` are the weights fields (YAML keys) already.
    def build_text_encoder(self, flavor: str):
        """The frozen text encoder of the model `flavor` (a ClipTextEncoder), as prep built it."""
        from latent_cache.encoders import build_text_encoder

        return build_text_encoder(flavor, self.text_encoder, self.text_width)

    def build_decoder_text_encoder(self, flavor: str):
        """The decoder's frozen text encoder (a ClipTextEncoder), as prep built it."""
        from latent_cache.encoders import build_decoder_text_encoder

        return build_decoder_text_encoder(flavor, self.decoder_text_encoder, self.decoder_text_width)

    def build_stage_a(self, flavor: str):
        """The Stage A whose latents the cache holds (for its fingerprint)."""
        from latent_cache.encoders import build_stage_a

        return build_stage_a(flavor, self.stage_a)

    def build_semantic_compressor(self, flavor: str):
        """The frozen semantic compressor of the model `flavor` (its fingerprint must match the cache's)."""
        from latent_cache.encoders import build_semantic_compressor

        return build_semantic_compressor(flavor, self.semantic)


@config_dataclass
class DataConfig:
    cache: str = "runs/cache/twemoji"
    validation_fraction: HeldOutFraction = 0.05  # held out by a hash of the key: the same rows in every run
    batch_size: PositiveInt = 32  # per worker and micro-step
    # Fine-tuning on new data: train on the rows of these source shards only, plus `replay_fraction`
    # of the other rows (None: every row). Validation always covers the whole cache's held-out rows.
    shards: list[str] | None = None
    replay_fraction: Probability = 1.0
    # Rows in each worker's local shuffle buffer (Ray Data's iter_batches): every epoch each worker
    # draws a new order of its rows, seeded by (seed, epoch, rank), so a resumed or rerun run sees the
    # same order again. 0: no shuffle. 2048 holds the whole Twemoji demo cache; a v2 row with bigG
    # embeddings is ~0.2 MB, so 2048 rows cost ~0.4 GB per worker.
    shuffle_buffer: NonNegativeInt = 2048
    # A worker whose share of the training rows is estimated at no more than this many MB (4 bytes a
    # value) reads it once and draws every epoch from memory: no re-read and no stall at epoch
    # boundaries (see EqualStepBatches). Where the whole cache is within it, each worker reads its
    # rows from the cache's files itself, without Ray Data (train.reads_in_process). 0: always
    # stream from the cache through Ray Data.
    memory_limit_mb: NonNegativeInt | NonNegativeFloat = 1024  # a whole number stays one (as runs recorded it)
    # A folder where each rank appends the keys of every batch it trains on (rank<N>.jsonl, one JSON
    # line per batch), to audit the data order; None: not written.
    order_log: str | None = None

    def __post_init__(self):
        # Below two batches, Ray's shuffling batcher hands out short batches in mid-epoch (ray#66085).
        if self.shuffle_buffer != 0 and self.shuffle_buffer < 2 * self.batch_size:
            raise ValueError(
                f"data.shuffle_buffer must be 0 (no shuffle) or at least 2 * data.batch_size = {2 * self.batch_size} rows, "
                f"got {self.shuffle_buffer}"
            )


@config_dataclass
class OptimConfig:
    lr: PositiveFloat = 1e-4
    betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.01
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0  # linear warmup, then constant (the original recipe uses 10,000)
    grad_clip: PositiveFloat = 1.0  # max gradient norm (0 would zero every gradient)
    grad_accum: PositiveInt = 1


@config_dataclass
class EmaConfig:
    # "every_step": ema = decay * ema + (1 - decay) * weights after every optimizer step.
    # "original": the Würstchen recipe: a plain copy every `every` steps until `copy_until`, then
    # every `every` steps (and at the last step) ema = beta * ema + (1 - beta) * weights. Steps
    # count from the run's start; copy_until must be below `steps` (else it never averages).
    mode: str = "every_step"
    decay: Probability = 0.999
    every: PositiveInt = 100
    beta: Probability = 0.9
    copy_until: NonNegativeInt = 5000

    def __post_init__(self):
        if self.mode not in EMA_MODES:
            raise ValueError(f"ema.mode must be one of {EMA_MODES}, got {self.mode!r}")


@config_dataclass
class ValidationConfig:
    every_steps: PositiveInt = 100
    t_grid: NoiseLevels = (0.1, 0.3, 0.5, 0.7, 0.9)  # every held-out sample at each of these t
    seed: int = 0  # the fixed noise
    # Stage C: caption -> latent retrieval at each validation. A latent is sampled (seeded, these
    # prior steps and guidance) for this many held-out captions and as many training captions (spread
    # over the cache), and each caption's own cached latent is ranked among the held-out latents and
    # those training ones. A prior that ignores its text stays at chance. 0: not measured.
    retrieval_captions: NonNegativeInt = 32
    retrieval_steps: PositiveInt = 10
    retrieval_guidance: NonNegativeFloat = 4.0
    # Stage C: a sample grid at each validation when this names a decoder bundle folder (one with a
    # bundle.json, e.g. weights/twemoji-small-decoders; its Stage B must have learned the cache's
    # semantic latents): for `picture_captions` training captions, what the decoders make of each one's
    # own cached latent beside what they make of the latent sampled from the caption, logged to MLflow
    # as validation/step_<step>.png (with the EMA weights). None: no pictures.
    decoders: str | None = None
    picture_captions: PositiveInt = 8


@config_dataclass
class CheckpointConfig:
    storage_path: str = "runs/train"  # local path or s3://bucket/prefix
    run_name: str = "stage-c-small"  # rerunning with the same name resumes from its latest checkpoint
    every_steps: PositiveInt = 100
    num_to_keep: PositiveInt = 2
    # FSDP2 only: "full" gathers the model and optimizer state to rank 0; "sharded" has every rank
    # write its own shard with torch.distributed.checkpoint (no gather; the EMA is still gathered,
    # written in the diffusers layout for consumers).
    fsdp_state_dict: str = "full"

    def __post_init__(self):
        if self.fsdp_state_dict not in ("full", "sharded"):
            raise ValueError(f"checkpoint.fsdp_state_dict must be 'full' or 'sharded', got {self.fsdp_state_dict!r}")

    def storage(self):
        """(pyarrow filesystem, root path) of storage_path, where the run's folder `run_name` lives."""
        from core.storage import resolve

        return resolve(self.storage_path)


@config_dataclass
class ParallelConfig:
    strategy: str = "ddp"  # or "fsdp2"
    num_workers: PositiveInt = 2
    use_gpu: bool = False
    cpus_per_worker: NonNegativeFloat = 1.0  # leave CPUs for Ray Data ingest: workers that hold every CPU starve it
    # "bf16": the step under bf16 autocast and, with FSDP2, the blocks' parameters gathered in bf16
    # (gradients reduced in fp32; the root's input and output maths, the optimizer and the EMA stay
    # fp32). "fp32": no autocast. "auto": bf16 on CUDA, fp32 on CPU.
    precision: str = "auto"
    # FSDP2: whether a block's gathered parameters are freed after its forward and gathered again for
    # its backward (less memory, one more all-gather per block). None: chosen by the model's size
    # (pipelines/training/parallel.py, RESHARD_ABOVE_BYTES).
    reshard_after_forward: bool | None = None
    # The memory of each worker's device (GiB). When set, or on GPU read from the driver's own GPU, a
    # run whose memory plan (`wuerstchen plan`, pipelines/training/memory.py) does not fit it is refused
    # before it starts, the plan in the message; memory_check=false starts it anyway.
    gpu_memory_gib: PositiveFloat | None = None
    memory_check: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"parallel.precision must be one of {PRECISIONS}, got {self.precision!r}")

    def bf16(self, device_type: str) -> bool:
        """Whether the step runs in bf16 on a device of this type."""
        return self.precision == "bf16" or (self.precision == "auto" and device_type == "cuda")


@config_dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else an sqlite store under runs/
    experiment: str = "wuerstchen-stage-c"
    log_every: PositiveInt = 10


@config_dataclass
class FaultConfig:
    """Test-only: make one worker fail once at a step, to exercise recovery; or make one rank's share
    of the data one batch short in every epoch, to exercise equal steps on uneven shares."""

    fail_at_step: NonNegativeInt | None = None
    rank: NonNegativeInt = 1
    marker: str | None = None  # a file whose existence means "already failed once"
    # "raise": an exception in the train function; "stall": write the marker (with the worker's pid)
    # and wait there, for a test to kill the worker process.
    action: str = "raise"
    short_rank: NonNegativeInt | None = None  # this rank drops the first batch of each epoch

    def __post_init__(self):
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"fault.action must be one of {FAULT_ACTIONS}, got {self.action!r}")
        if self.action == "stall" and not self.marker:
            raise ValueError("fault.action 'stall' needs fault.marker: the file that tells the test where the worker waits")


@config_dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    encoders: EncodersConfig = dataclasses.field(default_factory=EncodersConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: StageCObjective = dataclasses.field(default_factory=StageCObjective)  # model.stage "c"
    decoder_objective: StageBObjective = dataclasses.field(default_factory=StageBObjective)  # model.stage "b"
    vqgan_objective: StageAObjective = dataclasses.field(default_factory=StageAObjective)  # model.stage "a"
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    fault: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    steps: PositiveInt = 200
    seed: int = 0
    max_failures: Annotated[int, Field(ge=-1)] = 0  # -1: retry without limit (Ray's FailureConfig)
    ray_address: str | None = None
    num_cpus: PositiveInt | None = None  # for a local cluster only

    def __post_init__(self):
        # The step count is the run's own (a fine-tune starts at 0): a copy phase as long as the run
        # leaves an "EMA" that is the raw weights. The last step is always an update (see Ema.update).
        if self.ema.mode == "original" and self.ema.copy_until >= self.steps:
            raise ValueError(
                f"ema.copy_until={self.ema.copy_until} is not below steps={self.steps}: the original EMA schedule would only "
                f"copy the weights and never average them; set ema.copy_until below steps (0 for a fine-tune, whose "
                f"starting weights are already trained) or use ema.mode=every_step"
            )
