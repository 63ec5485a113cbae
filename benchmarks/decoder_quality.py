"""Reconstruction quality of a decoder bundle folder (default: the committed demo decoders) on the
held-out rows of a cache that holds images, beside seeded random decoders of the same flavor, in one
run: PSNR (dB) and SSIM of image -> Stage A -> image (quantized, and unquantized as Stage B's
latents are decoded) and of image -> (semantic latent, caption) -> Stage B sampling -> Stage A ->
image, for each number of decoder steps asked for.

    python -m benchmarks.decoder_quality [--bundle weights/twemoji-small-decoders]
        [--cache runs/cache/twemoji-decoders] [--decoder-steps 4 12] [--limit 86] [--json out.json]

The cache is the one `wuerstchen prep --config configs/prep_twemoji_decoders.yaml` makes (the first
step of `python -m pipelines.demo_decoders`); the held-out rows are the validation split of both
decoder trainings (by key hash), so no image measured here was trained on.
"""

import argparse
import time

from benchmarks.report import emit
from pipelines import decoder_bundle
from pipelines.quality import bundle_quality, split_rows
from pipelines.register import random_decoders


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(decoder_bundle.DEMO_DECODERS))
    parser.add_argument("--cache", default="runs/cache/twemoji-decoders")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--decoder-steps", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--limit", type=int, default=None, help="at most this many held-out rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    rows = split_rows(args.cache, args.validation_fraction, limit=args.limit)
    stage_b, stage_a, text, meta = decoder_bundle.load(args.bundle)
    baseline = random_decoders(meta["flavor"], seed=0, text_weights=decoder_bundle.text_encoder_weights(meta))
    results = {"bundle": args.bundle, "cache": args.cache, "held_out_rows": len(rows["key"]), "by_decoder_steps": {}}
    for steps in args.decoder_steps:
        row = {}
        for name, parts in (("trained", (stage_b, stage_a, text)), ("random", baseline)):
            start = time.perf_counter()
            figures = bundle_quality(*parts, rows, steps=steps, seed=args.seed)
            row[name] = {k: round(v, 4) for k, v in figures.items() if k != "images"}
            row[name]["seconds"] = round(time.perf_counter() - start, 1)
        row["psnr_gain_db"] = {k: round(row["trained"][k] - row["random"][k], 2) for k in row["trained"] if k.endswith("psnr")}
        results["by_decoder_steps"][str(steps)] = row
    emit(results, args.json)
    return results


if __name__ == "__main__":
    main()
