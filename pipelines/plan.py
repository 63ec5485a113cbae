"""`python -m pipelines.plan --config FILE [--set key=value ...] [--gpu-memory-gib 80]` / `wuerstchen
plan ...`: the memory plan of the training run a train config describes, before it starts: per GPU,
the parameters, gradients, optimizer state, EMA, activations and temporaries at the step's peak, and
whether that fits the GPU (see pipelines/training/memory.py for how it is measured, on fake tensors).

The tensor shapes are the cache's (its manifest), or, when the cache cannot be read here, those a
prep of the model's flavor at `--resolution` would write. `wuerstchen train` makes the same plan and
refuses a run that does not fit (parallel.gpu_memory_gib, parallel.memory_check).
"""

import logging
import math
import sys

import torch

from core.config import load
from pipelines.cli import add_config_arguments, job_parser, run_job
from pipelines.training.config import TrainConfig

log = logging.getLogger(__name__)
DOES_NOT_FIT = 3
DEFAULT_RESOLUTION = {"v2": 1024}  # else the prep config's default


def cache_shapes(cfg: TrainConfig, resolution: int | None = None) -> tuple[dict[str, list[int]], str]:
    """(tensor shapes, text mode) of the run's cache: its manifest's (of its largest bucket), or those
    a prep of the model's flavor at `resolution` would write (every column the stage may read)."""
    from core import storage
    from data_prep.config import PrepConfig
    from latent_cache import manifest as manifests
    from latent_cache.encoders import decoder_text_width, text_width

    try:
        manifest = manifests.read(*storage.resolve(cfg.data.cache))
    except Exception as err:  # noqa: BLE001 - a cache out of reach here (credentials, network) is not an error
        log.info("cache %s not readable here (%s): planning with a prep of the flavor's shapes", cfg.data.cache, err)
        manifest = None
    if manifest is not None:  # of several aspect-ratio buckets: the one of the most values a row (the largest activations)
        shapes = max((b["shapes"] for b in manifests.buckets(manifest).values()),
                     key=lambda bucket: sum(math.prod(shape) for shape in bucket.values()))
        return shapes, manifest["text_mode"]
    flavor = cfg.model.flavor
    side = resolution or DEFAULT_RESOLUTION.get(flavor)
    sets = [f"encode.flavor={flavor}", "encode.stage_a={}", "encode.decoder_text_encoder={}", "encode.images=true",
            "encode.semantic_images=true", *([f"encode.resolution={side}"] if side else [])]
    spec = load(PrepConfig, None, sets).encode.spec()
    return spec.tensor_shapes(text_width(flavor, cfg.encoders.text_width),
                              decoder_text_width(flavor, cfg.encoders.decoder_text_width)), spec.text_mode


def text_encoder_bytes(cfg: TrainConfig, text_mode: str) -> int:
    """The frozen text encoder a tokens-mode Stage C run holds on each GPU (fp32), from its config
    alone (built on the meta device); 0 in embeddings mode and for the other stages."""
    if text_mode != "tokens" or cfg.model.stage != "c":
        return 0
    weights = cfg.encoders.text_encoder
    if weights.path is None:  # the seeded random tower of tests and demos: small, built for real
        return sum(p.numel() * 4 for p in cfg.encoders.build_text_encoder(cfg.model.flavor).parameters())
    from transformers import AutoConfig, CLIPTextModel

    config = AutoConfig.from_pretrained(weights.path)
    with torch.device("meta"):
        tower = CLIPTextModel(getattr(config, "text_config", config))
    return sum(p.numel() * 4 for p in tower.parameters())


def gpu_bytes(cfg: TrainConfig) -> int | None:
    """The memory of a worker's device: parallel.gpu_memory_gib, or on GPU that of the driver's own
    GPU when it has one (the workers' GPUs are taken to be alike); None when unknown."""
    if cfg.parallel.gpu_memory_gib is not None:
        return int(cfg.parallel.gpu_memory_gib * 2**30)
    if cfg.parallel.use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def memory_plan(cfg: TrainConfig, resolution: int | None = None):
    from pipelines.training.memory import estimate

    shapes, text_mode = cache_shapes(cfg, resolution)
    return estimate(cfg, shapes, gpu_bytes=gpu_bytes(cfg), text_encoder_bytes=text_encoder_bytes(cfg, text_mode))


def check_fits(cfg: TrainConfig) -> None:
    """What `wuerstchen train` does before it starts: the plan on the console, and a run that does not
    fit refused (ValueError naming the settings). Planned where the device's size is known."""
    if gpu_bytes(cfg) is None:
        if cfg.parallel.use_gpu:
            log.info("no GPU size known here: no memory plan checked (set parallel.gpu_memory_gib)")
        return
    plan = memory_plan(cfg)
    log.info("%s", plan.describe())
    if plan.fits is False and cfg.parallel.memory_check:
        raise ValueError(f"this run does not fit its devices' memory:\n{plan.describe()}\nlower data.batch_size, use "
                         f"model.activation_checkpointing=selective or full, parallel.strategy=fsdp2 or more workers; or "
                         f"set parallel.memory_check=false to start it anyway")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("plan", __doc__, {0: "planned (it fits, or the GPU's size is unknown)", 1: "failed",
                                          2: "bad configuration", DOES_NOT_FIT: "planned: it does not fit the GPU"})
    add_config_arguments(parser, "a train config (see configs/)", "data.batch_size=64")
    parser.add_argument("--gpu-memory-gib", type=float, help="the GPU's memory (default: parallel.gpu_memory_gib, or this machine's GPU)")
    parser.add_argument("--gpus", type=int, help="plan for this many GPUs (default: parallel.num_workers)")
    parser.add_argument("--resolution", type=int, help="image side when the cache cannot be read here (default: 1024 for v2)")
    args = parser.parse_args(argv)

    def plan() -> int:
        overrides = list(args.overrides)
        if args.gpu_memory_gib is not None:
            overrides.append(f"parallel.gpu_memory_gib={args.gpu_memory_gib}")
        if args.gpus is not None:
            overrides.append(f"parallel.num_workers={args.gpus}")
        result = memory_plan(load(TrainConfig, args.config, overrides), args.resolution)
        print(result.describe())
        return DOES_NOT_FIT if result.fits is False else 0

    return run_job("plan", plan)


if __name__ == "__main__":
    sys.exit(main())
