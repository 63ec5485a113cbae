"""`wuerstchen demo` / `python -m pipelines.demo`: the main job, end to end, on embedded defaults: a
local Ray cluster, a local MLflow store (runs/mlflow.db), the bundled Twemoji data.

1. Data prep: 128 of the bundled Twemoji image-caption pairs (spread over the set) are filtered and
   encoded into the latent cache under runs/cache/twemoji (a rerun finds the cache complete and skips it).
2. Training: the `small` Stage C on the cache with Ray Train (2 CPU workers, DDP), checkpoints under
   runs/train, metrics in MLflow (a rerun resumes from the newest checkpoint).
3. Registration: the EMA weights become a version of `wuerstchen-stage-c` (alias challenger), which
   references a decoder bundle (`wuerstchen-decoders`, registered once: the small Stage B + Stage A
   trained on the Twemoji set by `python -m pipelines.demo_decoders`, when
   weights/twemoji-small-decoders holds them, else seeded random `small` weights).
4. The gate: the challenger is evaluated (held-out loss, text condition gap, caption -> latent
   retrieval for held-out and training captions) and promoted to champion when its training captions
   find their own latents clearly better than chance and it beats the champion (see
   pipelines/promote.py); refused otherwise.
5. A consumer, in a fresh process: `mlflow.pyfunc.load_model("models:/wuerstchen-stage-c@champion")`
   (or the version by number, while none has passed the gate) predicts a latent for every caption of
   the cache and a picture for 32 of them; the demo ranks each latent's own cached latent among all,
   and each picture's own emoji among all the real ones, and writes runs/demo/samples.png (the real
   emoji beside the generated ones, with captions; also logged to the training run in MLflow).

`--stages-only` runs the older check of every stage's forward/backward instead.
"""

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipelines.cli import job_parser, run_job
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


def prep_config(config: Path, cache_url: str | None, limit_shards: int | None = None, semantic: str | None = None):
    from data_prep.config import PrepConfig
    from core.config import load

    overrides = [f"output.url={cache_url}"] if cache_url else []
    overrides += [f"limit_shards={limit_shards}"] if limit_shards is not None else []
    overrides += [f"encode.semantic.path={semantic}"] if semantic else []
    return load(PrepConfig, config, overrides)


def demo_semantic_compressor(flavor: str) -> str | None:
    """The semantic compressor the demo decoders carry (trained with their Stage B), when they do:
    the prior's cache and training use it, so that the decoders read the latents the prior makes
    (their fingerprints must agree for the bundle to be pinned)."""
    from pipelines import decoder_bundle
    from stages.stage_b_with_compressor import COMPRESSOR_FOLDER

    meta = decoder_bundle.read_meta(decoder_bundle.DEMO_DECODERS)
    folder = decoder_bundle.DEMO_DECODERS / COMPRESSOR_FOLDER
    return str(folder) if meta is not None and meta["flavor"] == flavor and folder.is_dir() else None


def prepare_data(cfg) -> str:
    from data_prep.runner import run_prep
    from data_prep.summary import format_summary

    print(f"\n== 1. Data prep: {cfg.source.url} -> {cfg.output.url} (local Ray cluster)", flush=True)
    summary = run_prep(cfg, on_wave=lambda s: print(f"   committed wave {s['waves']}: {s['rows_written']} rows so far", flush=True))
    print(format_summary(summary), flush=True)
    return cfg.output.url


def train_config(config: Path, cache_url: str, steps: int | None, semantic: str | None = None):
    from core.config import load
    from pipelines.training.config import TrainConfig

    # with the demo decoders (whose compressor made the cache), a sample grid in MLflow at each validation
    bundle = [f"encoders.semantic.path={semantic}", f"validation.decoders={Path(semantic).parent}"] if semantic else []
    return load(TrainConfig, config, [f"data.cache={cache_url}"] + ([f"steps={steps}"] if steps is not None else []) + bundle)


def train(cfg):
    from pipelines.train import run_training

    print(f"\n== 2. Training: {cfg.model.flavor} Stage C, {cfg.steps} steps, {cfg.parallel.num_workers} workers "
          f"({cfg.parallel.strategy}); checkpoints in {cfg.checkpoint.storage_path}/{cfg.checkpoint.run_name}", flush=True)
    result, run_id = run_training(cfg)
    metrics = result.metrics or {}
    if "step" in metrics:
        print(f"   step {metrics['step']}: loss {metrics['loss']:.5f}, validation loss of the EMA weights "
              f"{metrics.get('val_loss_ema', float('nan')):.5f}; MLflow run {run_id}", flush=True)
    else:
        print(f"   already trained to step {cfg.steps} (raise --steps to train on); MLflow run {run_id}", flush=True)
    return run_id


def demo_decoders(flavor: str) -> tuple[str, str]:
    """The decoder bundle the demo registers, and what it is: the demo decoders when they are there
    (a bundle.json: built and passed their check) for this flavor, else seeded random ones."""
    from pipelines import decoder_bundle

    meta = decoder_bundle.read_meta(decoder_bundle.DEMO_DECODERS)
    if meta is not None and meta["flavor"] == flavor:
        figures = meta.get("reconstruction", {}).get("figures", {})
        psnr = figures.get("stage_a_psnr", {}).get("trained")
        return str(decoder_bundle.DEMO_DECODERS), (
            f"Stage B + Stage A trained on Twemoji ({decoder_bundle.DEMO_DECODERS.relative_to(decoder_bundle.ROOT)}"
            + (f", Stage A {psnr:.1f} dB on held-out emoji)" if psnr is not None else ")"))
    return "random", f"seeded random {flavor} Stage B + Stage A (no trained demo decoders of this flavor yet)"


def register_and_promote(cfg, uri: str) -> str:
    """Registers the newest checkpoint and runs the gate; returns the model URI a consumer loads: the
    champion's alias, or the version itself while no version has passed the gate."""
    from pipelines import registry
    from pipelines.evaluate import default_spec, describe, evaluate_model
    from pipelines.promote import promote
    from pipelines.register import register_decoders, register_stage_c
    from pipelines.training.tracking import RUN_NAME_TAG

    print("\n== 3. Registration in the MLflow model registry", flush=True)
    mlflow_client = registry.client(uri)
    source, described = demo_decoders(cfg.model.flavor)
    decoders = register_decoders(uri, registry.DECODERS_MODEL, source, flavor=cfg.model.flavor)
    print(f"   decoder bundle models:/{decoders['name']}/{decoders['version']} "
          f"({'registered now' if decoders['created'] else 'registered before'}: {described})")
    run = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.checkpoint.run_name}'", max_results=1,
    )[0]
    version = register_stage_c(uri, registry.STAGE_C_MODEL, run_id=run.info.run_id,
                               decoders=f"models:/{decoders['name']}/{decoders['version']}")
    print(f"   {'registered' if version['created'] else 'already registered as'} "
          f"models:/{version['name']}/{version['version']} from {version['source']}", flush=True)

    print("\n== 4. Evaluation and the promotion gate", flush=True)
    model_version = mlflow_client.get_model_version(version["name"], version["version"])
    if registry.version_by_alias(mlflow_client, version["name"], registry.CHALLENGER) is not None:
        result = evaluate_model(f"models:/{version['name']}/{version['version']}", default_spec(mlflow_client, model_version), uri)
        print(f"   on {result['rows']} held-out rows (spec {result['spec_id']}):")
        for line in describe(result):
            print(f"   {line}")
        decision = promote(uri, version["name"])
        print(f"   {decision['decision']}: {decision['reason']}", flush=True)
    else:
        print(f"   version {version['version']} went through the gate before: {model_version.tags.get('promotion.decision')}")
    champion = registry.version_by_alias(mlflow_client, version["name"], registry.CHAMPION)
    if champion is None:
        print(f"   no champion: the gate refused models:/{version['name']}/{version['version']}, and nothing before it "
              f"passed (train on: --steps); the consumer loads that version by number, to show what it makes")
        return f"models:/{version['name']}/{version['version']}"
    print(f"   champion: models:/{version['name']}/{champion.version}")
    return f"models:/{version['name']}@{registry.CHAMPION}"


# What a consumer writes: nothing of this project's internals, only MLflow and a model URI.
# argv: prompts (JSON), how many of them (the first) also become images, the output folder, the model URI.
CONSUMER = """
import json, sys
from pathlib import Path
import mlflow
import numpy as np
from PIL import Image

prompts, pictured, out, uri = json.loads(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
model = mlflow.pyfunc.load_model(uri)
latents = model.predict(prompts, params={"steps": 20, "guidance": 4.0, "seed": 0})
np.save(out / "consumer_latents.npy", latents)
if pictured:
    images = model.predict(prompts[:pictured], params={"output": "images", "steps": 20, "guidance": 4.0, "seed": 0})
    np.save(out / "consumer_images.npy", images)
    Image.fromarray(images[0]).save(out / "consumer_image.png")
print(json.dumps({"latents": [list(latents.shape), str(latents.dtype)]}))
"""

# How many of the cache's captions the consumer also turns into pictures (caption -> image retrieval
# and the sample grid): each costs a Stage B sampling and a Stage A decode.
PICTURED = 32


def real_emoji(keys: list[str], size: int) -> "torch.Tensor":
    """The Twemoji artwork of cache keys ("twemoji/1f34e"), rendered as prep renders it: (N, 3, S, S) in [0, 1]."""
    import io

    import numpy as np
    from PIL import Image

    from data_prep.sources.twemoji import render_png, svg_dir

    images = [np.asarray(Image.open(io.BytesIO(render_png(str(svg_dir() / f"{key.split('/', 1)[1]}.svg"), size))))
              for key in keys]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def consume(uri: str, cache_url: str, out_dir: Path, model_uri: str, pictures: int = PICTURED, run_id: str | None = None,
            validation_fraction: float = 0.05) -> dict:
    """Loads `model_uri` (the champion) in a fresh process, as a consumer would, has it predict a latent
    for every caption of the cache and a picture for `pictures` of them, and measures what it made:
    - caption -> latent: each prediction's own cached latent ranked among all cached latents, for the
      training captions and the held-out ones (chance: a median rank of N / 2);
    - caption -> image: each picture's own Twemoji artwork ranked among all the cache's emoji by pixel
      distance (when the cache is the Twemoji set);
    and writes runs/demo/samples.png, the real emoji beside the generated ones with their captions
    (logged to the training run `run_id` in MLflow)."""
    import json
    import os
    import subprocess

    import numpy as np
    from PIL import Image

    from latent_cache.reader import Cache, is_validation, tensor_column
    from pipelines.pictures import captioned_grid, to_uint8_images
    from pipelines.quality import own_image_ranks, own_latent_ranks, rank_figures, split_rank_figures
    from stages.latents import semantic_to_stage_c

    print(f"\n== 5. A consumer loads {model_uri} in a fresh process", flush=True)
    cache = Cache(cache_url)
    table = cache.read_table(["key", "caption", "stage_c_latents"])
    keys, captions = table.column("key").to_pylist(), table.column("caption").to_pylist()
    cached = torch.from_numpy(tensor_column(table, "stage_c_latents"))
    pictured = [int(i) for i in np.linspace(0, len(captions) - 1, min(pictures, len(captions)))] if pictures else []
    order = pictured + sorted(set(range(len(captions))) - set(pictured))  # the pictured ones first
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CONSUMER, json.dumps([captions[i] for i in order]), str(len(pictured)), str(out_dir), model_uri],
        env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the consumer process failed:\n{done.stderr[-3000:]}")
    semantic = np.load(out_dir / "consumer_latents.npy")
    print(f"   predict({len(order)} captions of the cache) -> latents {semantic.shape} {semantic.dtype}"
          + (f"; predict(output='images') for {len(pictured)} of them" if pictured else "")
          + f" ({time.perf_counter() - start:.0f} s)")
    ranks = own_latent_ranks(semantic_to_stage_c(torch.from_numpy(semantic)), cached, order)
    held = torch.tensor([is_validation(keys[i], validation_fraction) for i in order])
    figures = split_rank_figures(ranks, held, len(captions))
    for name, found in figures.items():
        count = int(held.sum()) if name == "held_out" else int((~held).sum())
        print(f"   {name.replace('_', '-')} captions ({count}) -> latent among all {len(captions)} cached: median rank "
              f"{found['median_rank']:.0f} (chance {found['chance_median_rank']:.0f}), top-1 {found['top1']:.0%}, "
              f"top-10 {found['top10']:.0%}")
    for i, rank in list(zip(order, ranks.tolist()))[:4]:
        print(f"   {captions[i]!r:<34} its own latent ranks {rank} of {len(captions)}")
    result = {"latents": str(out_dir / "consumer_latents.npy"), "shape": list(semantic.shape), "figures": figures, "image": None}
    if not pictured:
        return result
    generated = np.load(out_dir / "consumer_images.npy")
    result["image"] = str(out_dir / "consumer_image.png")
    if all(k.startswith("twemoji/") for k in keys):
        real = real_emoji(keys, generated.shape[1])
        image_ranks = own_image_ranks(torch.from_numpy(generated).permute(0, 3, 1, 2).float() / 255.0, real, pictured)
        found = rank_figures(image_ranks, len(keys))
        figures["image"] = found
        print(f"   caption -> image: each picture's own emoji among all {len(keys)} by pixel distance: median rank "
              f"{found['median_rank']:.0f} (chance {found['chance_median_rank']:.0f}), top-1 {found['top1']:.0%}, "
              f"top-10 {found['top10']:.0%}")
        grid = captioned_grid([captions[i] for i in pictured], [to_uint8_images(real[pictured]), generated],
                              headers=["the real emoji", f"generated by {model_uri}"])
        Image.fromarray(grid).save(out_dir / "samples.png")
        result["samples"] = str(out_dir / "samples.png")
        print(f"   {out_dir / 'samples.png'}: the real emoji beside the generated ones, with their captions")
        if run_id is not None:
            from mlflow import MlflowClient

            client = MlflowClient(uri)
            client.log_artifact(run_id, str(out_dir / "samples.png"), "demo")
            for name, values in figures.items():
                for k in ("median_rank", "top1", "top10"):
                    client.log_metric(run_id, f"demo_{name}_{k}", values[k])
            print(f"   samples.png and these figures logged to the training run {run_id}")
    return result


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    parser = job_parser("demo", __doc__, {
        0: "done",
        1: "a step failed (its error, and Ray's, are shown)",
        2: "bad arguments or configuration (both configs are checked before any work starts)",
    })
    parser.add_argument("--prep-config", type=Path, default=root / "configs" / "prep_twemoji.yaml")
    parser.add_argument("--train-config", type=Path, default=root / "configs" / "train_twemoji_small.yaml")
    parser.add_argument("--cache", default=None, help="where the latent cache goes (default: the prep config's output.url)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the train config's)")
    parser.add_argument("--limit-shards", type=int, default=None, help="prepare at most this many source shards (quick runs)")
    parser.add_argument("--pictures", type=int, default=PICTURED,
                        help=f"how many captions the consumer also turns into pictures (default {PICTURED}; 0: latents only)")
    parser.add_argument("--stages-only", action="store_true", help="only the forward/backward check of every stage")
    parser.add_argument("--flavor", default="small", choices=["tiny", "small"], help="with --stages-only")
    parser.add_argument("--image-size", type=int, default=256, help="with --stages-only; a multiple of 128")
    parser.add_argument("--out", type=Path, default=None, help="with --stages-only: keep the saved model folders here")
    args = parser.parse_args(argv)
    if args.stages_only:
        if args.image_size % 128:
            parser.error(f"--image-size must be a multiple of 128, got {args.image_size}")
        def stages_only() -> None:
            run(args.flavor, args.image_size, args.out)

        return run_job("demo", stages_only)
    # The demo prints what each step did itself: the jobs' INFO lines would say it twice.
    return run_job("demo", lambda: demo(args), own_level=logging.WARNING)


def demo(args: argparse.Namespace) -> None:
    import os

    # The demo prints what each step did: MLflow's artifact progress bars would only bury that.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # both configs are checked before any work starts
    prep_cfg = prep_config(args.prep_config, args.cache, args.limit_shards)
    semantic = demo_semantic_compressor(prep_cfg.encode.flavor)
    if semantic:
        prep_cfg = prep_config(args.prep_config, args.cache, args.limit_shards, semantic)
    cfg = train_config(args.train_config, prep_cfg.output.url, args.steps, semantic)
    start = time.perf_counter()
    cache_url = prepare_data(prep_cfg)
    run_id = train(cfg)
    from pipelines.training.tracking import tracking_uri

    uri = tracking_uri(cfg.tracking.tracking_uri)
    served = register_and_promote(cfg, uri)
    consumed = consume(uri, cache_url, Path("runs") / "demo", served, pictures=args.pictures, run_id=run_id,
                       validation_fraction=cfg.data.validation_fraction)
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    print(f"   latent cache:  {cache_url} (manifest.json holds the funnel and the encoder fingerprints)")
    print(f"   checkpoints:   {cfg.checkpoint.storage_path}/{cfg.checkpoint.run_name}")
    print(f"   served:        {served}")
    print(f"   consumer out:  {consumed['latents']}" + (f", {consumed['image']}" if consumed["image"] else ""))
    if consumed.get("samples"):
        print(f"   samples:       {consumed['samples']} (real emoji | generated, with captions; also in MLflow)")
    print(f"   MLflow:        {uri}   ->   mlflow ui --backend-store-uri {uri}")
    print(f"   export:        wuerstchen export --model {served} --out runs/export "
          f"--tracking-uri {uri}")


if __name__ == "__main__":
    sys.exit(main())
