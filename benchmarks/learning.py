"""Does the demo's prior learn its captions? The demo configuration trained for a fixed budget
beside an unconditional control (the same run with every caption dropped), both through the real
Ray Train job, then measured side by side as a consumer would sample them (20 prior steps, guidance 4,
seed 0) on every caption of the cache:

- caption -> latent retrieval: each sample's own cached latent ranked among all N cached latents
  (training and held-out captions apart; chance is a median rank of (N + 1) / 2);
- the Fréchet distance between the training captions' samples and their real latents (in the latent
  space, `pipelines.quality.latent_frechet_distance`): a prior that ignores its text can still make
  plausible latents, so this is close for both, where retrieval is not.

    python -m benchmarks.learning [--steps 1000] [--json out.json]
    python -m benchmarks.learning --set objective.latent_space=v2      # the public checkpoints' space

The cache is the demo's (prepared as `wuerstchen demo` prepares it, reused when complete); the runs
and their MLflow store go to a temporary folder (--out to keep them).
"""

import argparse
import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import emit

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = {"steps": 20, "guidance": 4.0, "seed": 0}


def measure(checkpoint_cfg, cfg, cache) -> dict:
    """The registered weights' (EMA) figures of a run's newest checkpoint, on every cached caption."""
    from latent_cache.reader import is_validation, tensor_column
    from pipelines.quality import caption_retrieval, latent_frechet_distance, split_rank_figures
    from pipelines.training import checkpoint as ckpt_io
    from pipelines.train import expected_fingerprints
    from stages import StageC
    from stages.sampler import WuerstchenSampler

    with ckpt_io.latest(checkpoint_cfg).as_directory() as folder:
        stage_c = StageC.from_pretrained(Path(folder) / "ema").eval()
    _, text_encoder = expected_fingerprints(cfg)
    table = cache.read_table(["key", "caption", "stage_c_latents"])
    keys, captions = table.column("key").to_pylist(), table.column("caption").to_pylist()
    cached = torch.from_numpy(tensor_column(table, "stage_c_latents"))
    sampler = WuerstchenSampler(stage_c, text_encoder, latent_space=cfg.objective.latent_space)
    size = cache.manifest["resolution"]
    found = caption_retrieval(sampler, captions, cached, list(range(len(captions))), size, size,
                              steps=SAMPLING["steps"], guidance=SAMPLING["guidance"], seed=SAMPLING["seed"])
    held = torch.tensor([is_validation(k, cfg.data.validation_fraction) for k in keys])
    out = {}
    for name, figures in split_rank_figures(found["ranks"], held, len(captions)).items():
        out.update({f"{name}_{k}": round(v, 4) for k, v in figures.items() if k != "chance_median_rank"})
        out[f"{name}_captions"] = int(held.sum()) if name == "held_out" else int((~held).sum())
    out["chance_median_rank"] = (len(captions) + 1) / 2
    out["latent_frechet_distance"] = round(latent_frechet_distance(found["sampled"][~held], cached[~held]), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    from core.config import load
    from latent_cache.reader import Cache
    from pipelines import demo
    from pipelines.train import run_training
    from pipelines.training.config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prep-config", type=Path, default=ROOT / "configs" / "prep_twemoji.yaml")
    parser.add_argument("--train-config", type=Path, default=ROOT / "configs" / "train_twemoji_small.yaml")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each run (default: the config's)")
    parser.add_argument("--set", action="append", default=[], help="a train config override KEY=VALUE, for both runs")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs and their MLflow store here")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    prep_cfg = demo.prep_config(args.prep_config, None)
    semantic = demo.demo_semantic_compressor(prep_cfg.encode.flavor)
    if semantic:
        prep_cfg = demo.prep_config(args.prep_config, None, semantic=semantic)
    cache_url = demo.prepare_data(prep_cfg)
    cache = Cache(cache_url)
    results = {"cache": cache_url, "rows": cache.rows, "sampling": SAMPLING}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() if args.out is None else contextlib.nullcontext(str(args.out)) as tmp:
        for name, overrides in (("conditional", []), ("unconditional_control", ["objective.caption_dropout=1.0"])):
            cfg = load(TrainConfig, args.train_config, [
                f"data.cache={cache_url}", *([f"steps={args.steps}"] if args.steps else []),
                *([f"encoders.semantic.path={semantic}"] if semantic else []),
                f"checkpoint.storage_path={Path(tmp) / 'train'}", f"checkpoint.run_name=learning-{name}",
                f"tracking.tracking_uri=sqlite:///{Path(tmp) / 'mlflow.db'}", *args.set, *overrides,
            ])
            print(f"\n== {name}: {cfg.steps} steps, {cfg.model.flavor} Stage C, latent space {cfg.objective.latent_space}, "
                  f"caption dropout {cfg.objective.caption_dropout}", flush=True)
            start = time.perf_counter()
            run_training(cfg)
            trained = time.perf_counter() - start
            figures = measure(cfg.checkpoint, cfg, cache)
            results[name] = {"steps": cfg.steps, "train_seconds": round(trained, 1), **figures}
            if name == "conditional":
                config = dataclasses.asdict(cfg)
                results["config"] = {k: config[k] for k in ("model", "data", "objective", "optim", "ema")}
            print(f"   {name}: {figures}", flush=True)
    results["control"] = "the same config with objective.caption_dropout=1.0"
    cond, control = results["conditional"], results["unconditional_control"]
    results["training_median_rank_vs_control"] = round(cond["training_median_rank"] / control["training_median_rank"], 4)
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
