"""`wuerstchen demo-decoders` / `python -m pipelines.demo_decoders`: trains the decoders of the bundled
demo on the Twemoji set, from scratch, and writes them with what they were trained with and how well
they reconstruct into weights/twemoji-small-decoders/ (to be committed in the repository: `wuerstchen
demo` registers the folder as its decoder bundle when it holds a bundle.json). About 1 hour on 2 CPU
cores.

1. prep   configs/prep_twemoji_decoders.yaml     images, semantic latents, decoder text -> runs/cache/twemoji-decoders
2. train  configs/train_stage_a_twemoji_small.yaml   Stage A on the images             -> vqgan/
          (its scale_factor set to the std of its latents, so that Stage B's have unit variance)
3. prep   configs/prep_twemoji_stage_b.yaml       the latents of that Stage A          -> runs/cache/twemoji-stage-b
4. train  configs/train_stage_b_twemoji_demo.yaml    Stage B on them                     -> decoder/
5. measure on the held-out emoji (the validation split of both trainings): PSNR / SSIM of
   image -> Stage A -> image and of image -> (semantic latent, caption) -> Stage B sampling ->
   Stage A -> image, beside seeded random decoders and beside the control of another emoji's
   semantic latent; written to bundle.json with the fingerprints and the training runs, and the
   regenerated emoji beside the originals to reconstructions.png. A Stage B that does not follow
   its semantic condition (`pipelines.quality.condition_problems`) fails the build: its figures go
   to bundle.rejected.json instead, and the demo keeps its random decoders.

Of each training run's last checkpoint, the weights (EMA or raw) with the better held-out figure are
taken. Every step resumes: a complete cache is skipped, a training run continues from its newest
checkpoint, so rerunning after an interruption (or with more steps) redoes nothing.
"""

import json
import shutil
from pathlib import Path

from pipelines import decoder_bundle
from pipelines.cli import job_parser, run_job

CONFIGS = decoder_bundle.ROOT / "configs"
PREP_IMAGES = CONFIGS / "prep_twemoji_decoders.yaml"
TRAIN_STAGE_A = CONFIGS / "train_stage_a_twemoji_small.yaml"
PREP_STAGE_B = CONFIGS / "prep_twemoji_stage_b.yaml"
TRAIN_STAGE_B = CONFIGS / "train_stage_b_twemoji_demo.yaml"
# Where the figures of a bundle that failed the condition check go (instead of bundle.json).
REJECTED_FILE = "bundle.rejected.json"
# Which figure of a checkpoint's validation picks its weights (higher or lower is better).
PICK_BY = {"a": ("val_psnr", max), "b": ("val_loss", min)}


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def prep(config: Path, overrides: list[str]) -> str:
    from core.config import load
    from data_prep.config import PrepConfig
    from data_prep.runner import run_prep
    from data_prep.summary import format_summary

    cfg = load(PrepConfig, config, overrides)
    _banner(f"prep {config.name}: {cfg.source.url} -> {cfg.output.url}")
    summary = run_prep(cfg, on_wave=lambda s: print(f"   committed wave {s['waves']}: {s['rows_written']} rows so far", flush=True))
    print(format_summary(summary), flush=True)
    return cfg.output.url


def train(config: Path, overrides: list[str], out: Path, parts: dict[str, str] | None = None) -> dict:
    """Trains (or resumes) a run and copies the better weights of its newest checkpoint to `out`
    (with `parts`, each subfolder of them to out / its name: Stage B trained with its compressor);
    returns what bundle.json records of it."""
    from core.config import load
    from pipelines.train import run_training
    from pipelines.training import checkpoint as ckpt_io
    from pipelines.training.config import TrainConfig

    cfg = load(TrainConfig, config, overrides)
    stage = cfg.model.stage
    _banner(f"train {config.name}: Stage {stage.upper()} ({cfg.model.flavor}), {cfg.steps} steps, "
            f"checkpoints in {cfg.checkpoint.storage_path}/{cfg.checkpoint.run_name}")
    _, run_id = run_training(cfg)
    found = ckpt_io.latest(cfg.checkpoint)
    if found is None:
        raise RuntimeError(f"the run {cfg.checkpoint.run_name} left no complete checkpoint")
    with found.as_directory() as folder:
        state = ckpt_io.read_train_state(Path(folder))
        figure, better = PICK_BY[stage]
        validation = state.get("validation", {})
        scores = {name: validation.get(f"{figure}_{'raw' if name == 'model' else 'ema'}") for name in ("ema", "model")}
        measured = {name: score for name, score in scores.items() if score is not None}
        pick = better(measured, key=measured.get) if measured else "ema"
        for source, target in ({"": out} if parts is None else {sub: out / name for sub, name in parts.items()}).items():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(Path(folder) / pick / source, target)
    print(f"   step {state['step']}: {figure} {', '.join(f'{n} {s:.4g}' for n, s in measured.items())}: "
          f"took the {'EMA' if pick == 'ema' else 'raw'} weights -> {out}", flush=True)
    return {"config": str(config.relative_to(decoder_bundle.ROOT)), "run_name": cfg.checkpoint.run_name,
            "mlflow_run_id": run_id, "step": state["step"], "weights": pick,
            "validation": {k: round(v, 6) for k, v in validation.items()},
            "cache_fingerprints": state.get("cache_fingerprints", {})}


def set_scale_factor(folder: Path, cache_url: str, fraction: float, rows: int = 256) -> float:
    """Sets the scale_factor of the Stage A in `folder` (its config.json) to the std of its latents h
    on training images, so that Stage B's z_B = h / scale_factor has unit variance as the diffusion
    schedule assumes (the public Stage A's 0.3764 is that of its own latents; a Stage A trained here
    has h of std ~1, and Stage B trained at 0.3764 would learn latents of std ~2.5, which the noise
    schedule's high-noise steps, where the picture's layout is decided, barely perturb)."""
    import torch

    from pipelines.quality import split_rows
    from stages import StageA

    images = split_rows(cache_url, fraction, held_out=False, limit=rows)["images"]
    stage_a = StageA.from_pretrained(folder).eval()
    with torch.no_grad():
        h = torch.cat([stage_a.encode(batch) for batch in images.split(32)])
    factor = round(float(h.std()), 4)
    config = json.loads((folder / "config.json").read_text())
    config["scale_factor"] = factor
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(f"   Stage A latents h on {len(images)} training images: std {factor} -> scale_factor {factor}", flush=True)
    return factor


def measure(out: Path, cache_url: str, fraction: float, steps: int, seed: int = 0) -> dict:
    """The reconstruction figures of the bundle in `out` and of seeded random decoders, side by side,
    on the held-out rows; reconstructions.png: 32 held-out emoji, each beside what the bundle
    regenerates from its semantic latent."""
    import torch

    from pipelines.quality import bundle_quality, split_rows
    from pipelines.register import random_decoders

    rows = split_rows(cache_url, fraction)
    stage_b, stage_a, text, meta = decoder_bundle.load(out)
    compressor = decoder_bundle.load_semantic_compressor(out)
    if compressor is not None:  # Stage B learned this compressor's latents, not the cache's
        rows["stage_c_latents"] = semantic_latents(compressor, rows, cache_url)
    _banner(f"measure: {len(rows['key'])} held-out emoji of {cache_url}")
    trained = bundle_quality(stage_b, stage_a, text, rows, steps=steps, seed=seed)
    random_b, random_a, random_text = random_decoders(meta["flavor"], seed=0, text_weights=decoder_bundle.text_encoder_weights(meta))
    baseline = bundle_quality(random_b, random_a, random_text, rows, steps=steps, seed=seed)
    figures = {name: {"trained": round(trained[name], 4), "random": round(baseline[name], 4)}
               for name in trained if name != "images"}
    for name, pair in figures.items():
        print(f"   {name:<28} trained {pair['trained']:8.3f}   random {pair['random']:8.3f}", flush=True)
    save_grid(torch.stack([rows["images"], trained["images"]], dim=1).flatten(0, 1)[:64], out / "reconstructions.png", columns=8)
    return {"held_out_rows": len(rows["key"]), "decoder_steps": steps, "seed": seed, "figures": figures}


def semantic_latents(compressor, rows: dict, cache_url: str):
    """z_C of the rows by `compressor`, from their semantic_images (the compressor's input as prep cut it)."""
    import torch

    from stages.latents import semantic_to_stage_c

    if "semantic_images" not in rows:
        raise ValueError(f"the bundle's semantic compressor was trained with its Stage B: measuring it needs the "
                         f"compressor's input images, which {cache_url} lacks (prep with encode.semantic_images: true)")
    with torch.no_grad():
        return semantic_to_stage_c(torch.cat([compressor.eval()(x) for x in rows["semantic_images"].split(16)]))


def log_to_mlflow(cfg, run_id: str, out: Path, figures: dict) -> None:
    """The figures (of the trained bundle) and the picture into the Stage B training run, where a
    user looking at it in `mlflow ui` finds them."""
    from mlflow.tracking import MlflowClient

    from pipelines.training.tracking import tracking_uri

    client = MlflowClient(tracking_uri(cfg.tracking.tracking_uri))
    for name, pair in figures.items():
        client.log_metric(run_id, f"reconstruction_{name}", pair["trained"])
    client.log_artifact(run_id, str(out / "reconstructions.png"), "reconstruction")
    print(f"   figures and reconstructions.png logged to the Stage B run {run_id}", flush=True)


def save_grid(images, path: Path, columns: int) -> None:
    """(N, 3, H, W) in [0, 1] -> one PNG, `columns` to a row."""
    from PIL import Image
    from torchvision.utils import make_grid

    from pipelines.pictures import to_uint8_images

    Image.fromarray(to_uint8_images(make_grid(images, nrow=columns, padding=2, pad_value=1.0)[None])[0]).save(path)


def build(out: Path = decoder_bundle.DEMO_DECODERS, stage_a_steps: int | None = None,
          stage_b_steps: int | None = None) -> dict:
    """The five steps; the configs name weights/twemoji-small-decoders/vqgan as Stage B's Stage A,
    which another `out` replaces."""
    from core.config import load
    from pipelines.quality import condition_problems
    from pipelines.training.config import TrainConfig
    from stages.sampler import DECODER_STEPS

    from stages.stage_b_with_compressor import COMPRESSOR_FOLDER, DECODER_FOLDER

    steps = lambda n: [f"steps={n}"] if n is not None else []  # noqa: E731
    elsewhere = out.resolve() != decoder_bundle.DEMO_DECODERS.resolve()
    out.mkdir(parents=True, exist_ok=True)
    images = prep(PREP_IMAGES, [])
    stage_a = train(TRAIN_STAGE_A, steps(stage_a_steps), out / "vqgan")
    a_cfg = load(TrainConfig, TRAIN_STAGE_A, steps(stage_a_steps))
    scale = set_scale_factor(out / "vqgan", images, a_cfg.data.validation_fraction)
    latents = prep(PREP_STAGE_B, [f"encode.stage_a.path={out / 'vqgan'}"] if elsewhere else [])
    b_overrides = [f"data.cache={latents}", f"decoder_objective.scale_factor={scale}",
                   *([f"encoders.stage_a.path={out / 'vqgan'}"] if elsewhere else []), *steps(stage_b_steps)]
    b_cfg = load(TrainConfig, TRAIN_STAGE_B, b_overrides)
    joint = b_cfg.model.train_semantic_compressor
    stage_b = train(TRAIN_STAGE_B, b_overrides, out / "decoder" if not joint else out,
                    {DECODER_FOLDER: DECODER_FOLDER, COMPRESSOR_FOLDER: COMPRESSOR_FOLDER} if joint else None)
    fingerprints = stage_b.pop("cache_fingerprints")
    stage_a.pop("cache_fingerprints")
    if joint:  # Stage B learned the latents of the compressor trained with it
        from latent_cache.encoders import model_fingerprint
        from latent_cache.spec import EncoderWeights
        from stages import SemanticCompressor

        path = out / COMPRESSOR_FOLDER
        fingerprints["semantic_compressor"] = model_fingerprint(
            "semantic_compressor", SemanticCompressor.from_pretrained(path), EncoderWeights(str(path)))["fingerprint"]
    text = b_cfg.encoders.decoder_text_encoder
    meta = {
        "flavor": b_cfg.model.flavor,
        "decoder_text_encoder": {"path": text.path, "seed": text.seed},
        "fingerprints": fingerprints,
        "training": {"stage_a": stage_a, "stage_b": stage_b},
        "command": "python -m pipelines.demo_decoders",
    }
    decoder_bundle.write_meta(out, meta)  # what `measure` loads the bundle by
    meta["reconstruction"] = measure(out, images, b_cfg.data.validation_fraction, DECODER_STEPS)
    decoder_bundle.write_meta(out, meta)
    log_to_mlflow(b_cfg, stage_b["mlflow_run_id"], out, meta["reconstruction"]["figures"])
    problems = condition_problems({k: v["trained"] for k, v in meta["reconstruction"]["figures"].items()})
    if problems:  # kept for a look, but not as a bundle: the demo registers only a bundle.json
        (out / decoder_bundle.BUNDLE_FILE).rename(out / REJECTED_FILE)
        raise RuntimeError(f"the Stage B of {out} does not follow its semantic condition: {'; '.join(problems)}. "
                           f"Its figures are in {out / REJECTED_FILE}; train it longer (--stage-b-steps) or on "
                           f"better-conditioned latents")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    _banner(f"done: the demo decoders are in {out} ({size:.1f} MB)")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("demo-decoders", __doc__, {
        0: "done: the bundle is written",
        1: "a step failed",
        2: "bad arguments or configuration",
    })
    parser.add_argument("--out", type=Path, default=decoder_bundle.DEMO_DECODERS, help="where the bundle goes")
    parser.add_argument("--stage-a-steps", type=int, default=None, help="default: the Stage A config's")
    parser.add_argument("--stage-b-steps", type=int, default=None, help="default: the Stage B config's")
    args = parser.parse_args(argv)
    return run_job("demo-decoders", lambda: build(args.out, args.stage_a_steps, args.stage_b_steps) and None)


if __name__ == "__main__":
    raise SystemExit(main())
