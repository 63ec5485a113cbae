"""`wuerstchen demo` / `python -m pipelines.demo`: the main job as far as it exists, on embedded
defaults: a local Ray cluster, a local MLflow store (runs/mlflow.db), the bundled Twemoji data.

1. Data prep: the 1,903 Twemoji image-caption pairs are filtered and encoded into the latent cache
   under runs/cache/twemoji (a rerun finds the cache complete and skips it).
2. Training: the `small` Stage C on the cache with Ray Train (2 CPU workers, DDP), checkpoints under
   runs/train, metrics in MLflow (a rerun resumes from the newest checkpoint).
3. Sampling from the trained EMA weights: Stage C latents for a few cached captions, each compared
   with the nearest latent in the cache.

Registration, the promotion gate and loading `models:/...@champion` come with the model registry
(not built yet). `--stages-only` runs the older check of every stage's forward/backward instead.
"""

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from stages import SemanticCompressor, StageA, StageB, StageC


def _timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"  {label:<58} {time.perf_counter() - start:6.2f} s", flush=True)
    return out


def run(flavor: str = "small", image_size: int = 256, out_dir: Path | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    print(f"Würstchen stages, flavor '{flavor}', random weights, one {image_size}px image on the CPU")
    effnet = SemanticCompressor.from_flavor(flavor).eval()
    stage_a = StageA.from_flavor(flavor).eval()
    stage_b = StageB.from_flavor(flavor)
    stage_c = StageC.from_flavor(flavor)
    for name, model in [("semantic compressor", effnet), ("Stage A", stage_a), ("Stage B", stage_b), ("Stage C", stage_c)]:
        print(f"  {name:<20} {model.num_parameters():>12,} parameters")

    image = torch.rand(1, 3, image_size, image_size)
    semantic_size = image_size * 3 // 4  # the semantic compressor sees the image at 0.75x
    with torch.no_grad():
        small_image = torch.nn.functional.interpolate(image, size=semantic_size, mode="bilinear", antialias=True)
        e = _timed(f"semantic compressor {tuple(small_image.shape)} -> e", lambda: effnet(small_image))
        h = _timed(f"Stage A encode {tuple(image.shape)} -> h", lambda: stage_a.encode(image))
        _timed(f"Stage A decode {tuple(h.shape)} -> image", lambda: stage_a.decode(h))
    print(f"  semantic latent e {tuple(e.shape)}, Stage A latent h {tuple(h.shape)}")

    text_c = torch.randn(1, 77, stage_c.config.c_cond)  # stands in for text-encoder tokens
    text_b = torch.randn(1, 77, stage_b.config.clip_embd)
    r = torch.rand(1)
    losses = {}
    for name, model, inputs in [
        ("Stage C", stage_c, (torch.randn_like(e), r, text_c)),
        ("Stage B", stage_b, (torch.randn_like(h), r, e, text_b)),
    ]:
        def step(model=model, inputs=inputs):
            loss = model(*inputs).square().mean()
            loss.backward()
            return loss.item()

        losses[name] = _timed(f"{name} forward + backward on {tuple(inputs[0].shape)}", step)

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() if out_dir is None else contextlib.nullcontext(str(out_dir)) as folder:
        for name, model in [("prior", stage_c), ("decoder", stage_b), ("vqgan", stage_a)]:
            model.save_pretrained(Path(folder) / name)
            loaded = type(model).from_pretrained(Path(folder) / name)
            same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
            if not same:
                raise RuntimeError(f"{name} did not round-trip through {folder}")
        print(f"  saved and reloaded prior/, decoder/, vqgan/ in the diffusers layout ({folder}): identical")
    print("Done: every stage builds, runs forward and backward, and round-trips through the diffusers layout.")
    return losses


def prepare_data(config: Path, cache_url: str | None) -> str:
    from data_prep.config import PrepConfig
    from data_prep.runner import format_summary, run_prep
    from pipelines.config import load

    cfg = load(PrepConfig, config, [f"output.url={cache_url}"] if cache_url else [])
    print(f"\n== 1. Data prep: {cfg.source.url} -> {cfg.output.url} (local Ray cluster)", flush=True)
    print(format_summary(run_prep(cfg)), flush=True)
    return cfg.output.url


def train(config: Path, cache_url: str, steps: int | None):
    from pipelines.config import load
    from pipelines.train import run_training
    from pipelines.training.config import TrainConfig

    overrides = [f"data.cache={cache_url}"] + ([f"steps={steps}"] if steps else [])
    cfg = load(TrainConfig, config, overrides)
    print(f"\n== 2. Training: {cfg.model.flavor} Stage C, {cfg.steps} steps, {cfg.parallel.num_workers} workers "
          f"({cfg.parallel.strategy}); checkpoints in {cfg.checkpoint.storage_path}/{cfg.checkpoint.run_name}", flush=True)
    result, run_id = run_training(cfg)
    metrics = result.metrics or {}
    if "step" in metrics:
        print(f"   step {metrics['step']}: loss {metrics['loss']:.5f}, validation loss {metrics.get('val_loss', float('nan')):.5f}; "
              f"MLflow run {run_id}", flush=True)
    else:
        print(f"   already trained to step {cfg.steps} (raise --steps to train on); MLflow run {run_id}", flush=True)
    return cfg, result


def sample(cfg, result, cache_url: str, prompts: int = 4) -> None:
    """Samples Stage C latents for cached captions with the trained EMA weights and reports, for each,
    the caption of the nearest cached latent."""
    import numpy as np

    from data_prep.cache import Cache
    from data_prep.config import EncodeConfig
    from data_prep.encoders import build_text_encoder
    from stages.latents import semantic_to_stage_c
    from stages.sampler import WuerstchenSampler

    print("\n== 3. Sampling from the trained EMA weights (Stage C only)", flush=True)
    from pipelines.training import checkpoint as ckpt_io

    checkpoint = result.checkpoint or ckpt_io.latest(cfg.checkpoint.storage_path, cfg.checkpoint.run_name)
    with checkpoint.as_directory() as folder:
        prior = StageC.from_pretrained(Path(folder) / "ema")
    enc = cfg.encoders
    text = build_text_encoder(EncodeConfig(flavor=cfg.model.flavor, text_encoder=enc.text_encoder, text_width=enc.text_width))
    table = Cache(cache_url).read_table(["caption", "stage_c_latents"])
    captions = table.column("caption").to_pylist()
    cached = np.concatenate([c.to_numpy_ndarray() for c in table.column("stage_c_latents").chunks]).astype(np.float32)
    side = 256  # the demo cache's resolution: 6x6 Stage C latents
    picks = [captions[i] for i in np.linspace(0, len(captions) - 1, prompts).astype(int)]
    semantic = WuerstchenSampler(prior, text)(picks, height=side, width=side, prior_steps=20, prior_guidance=4.0,
                                              generator=0, output="semantic", progress=False)
    z_c = semantic_to_stage_c(semantic).numpy().reshape(len(picks), -1)
    distances = ((cached.reshape(len(cached), -1)[None] - z_c[:, None]) ** 2).mean(-1)
    for prompt, row in zip(picks, distances):
        nearest = int(row.argmin())
        rank = int((row < row[captions.index(prompt)]).sum()) + 1
        print(f"   {prompt!r:<32} nearest cached latent: {captions[nearest]!r} (its own latent ranks {rank} of {len(captions)})")


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(prog="wuerstchen demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prep-config", type=Path, default=root / "configs" / "prep_twemoji.yaml")
    parser.add_argument("--train-config", type=Path, default=root / "configs" / "train_twemoji_small.yaml")
    parser.add_argument("--cache", default=None, help="where the latent cache goes (default: the prep config's output.url)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the train config's)")
    parser.add_argument("--stages-only", action="store_true", help="only the forward/backward check of every stage")
    parser.add_argument("--flavor", default="small", choices=["tiny", "small"], help="with --stages-only")
    parser.add_argument("--image-size", type=int, default=256, help="with --stages-only; a multiple of 128")
    parser.add_argument("--out", type=Path, default=None, help="with --stages-only: keep the saved model folders here")
    args = parser.parse_args(argv)
    if args.stages_only:
        if args.image_size % 128:
            parser.error(f"--image-size must be a multiple of 128, got {args.image_size}")
        run(args.flavor, args.image_size, args.out)
        return 0
    start = time.perf_counter()
    cache_url = prepare_data(args.prep_config, args.cache)
    cfg, result = train(args.train_config, cache_url, args.steps)
    sample(cfg, result, cache_url)
    from pipelines.training.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking.tracking_uri)
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    print(f"   latent cache:  {cache_url} (manifest.json holds the funnel and the encoder fingerprints)")
    print(f"   checkpoints:   {cfg.checkpoint.storage_path}/{cfg.checkpoint.run_name}")
    print(f"   MLflow:        {uri}   ->   mlflow ui --backend-store-uri {uri}")
    print("   Not yet part of the demo: registration, the promotion gate and loading models:/...@champion.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
