"""`wuerstchen demo` / `python -m pipelines.demo`: the main job as far as it exists, on embedded defaults.

1. Data prep on a local Ray cluster: the bundled Twemoji set (1,903 image-caption pairs) is filtered
   and encoded into the latent cache under runs/cache/twemoji (a rerun finds it done and skips it).
2. The `small` flavor of every stage: a real forward and backward pass on the CPU, and a round trip
   through the diffusers folder format.

Training, evaluation, registration and consumption through MLflow are not built yet; this demo
trains nothing and its model weights are random.
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
    print("Done. Not yet part of this demo: training, evaluation, MLflow registration and consumption (they come next).")
    return losses


def prepare_data(config: Path, cache_url: str | None) -> None:
    from data_prep.config import PrepConfig
    from data_prep.runner import format_summary, run_prep
    from pipelines.config import load

    overrides = [f"output.url={cache_url}"] if cache_url else []
    cfg = load(PrepConfig, config, overrides)
    print(f"Data prep: {cfg.source.url} -> {cfg.output.url} (local Ray cluster)", flush=True)
    print(format_summary(run_prep(cfg)), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wuerstchen demo", description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small", choices=["tiny", "small"])
    parser.add_argument("--image-size", type=int, default=256, help="multiple of 128")
    parser.add_argument("--out", type=Path, default=None, help="keep the saved model folders here")
    parser.add_argument("--prep-config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "prep_twemoji.yaml")
    parser.add_argument("--cache", default=None, help="where the latent cache goes (default: the config's output.url)")
    parser.add_argument("--skip-prep", action="store_true", help="only the stage check")
    args = parser.parse_args(argv)
    if args.image_size % 128:
        parser.error(f"--image-size must be a multiple of 128, got {args.image_size}")
    if not args.skip_prep:
        prepare_data(args.prep_config, args.cache)
    run(args.flavor, args.image_size, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
