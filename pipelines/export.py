"""`python -m pipelines.export` / `wuerstchen export`: a registered Stage C version as a diffusers
pipeline folder.

    wuerstchen export --model models:/wuerstchen-stage-c@champion --out DIR [--tracking-uri URI]

DIR holds a `WuerstchenPriorPipeline` (prior/, text_encoder/, tokenizer/, scheduler/), or, when the
version references a decoder bundle, a `WuerstchenCombinedPipeline` with Stage B, Stage A and the
decoder's text encoder too. The referenced text encoders are materialised (their fingerprints are
checked first). Exit codes: 0 written, 2 bad arguments, 1 failed.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from pipelines import registry


def export(model_uri: str, out: str | Path, tracking_uri: str | None = None, overwrite: bool = False) -> Path:
    import mlflow

    from pipelines.pyfunc_models import DecoderModel, TextEncoderRef
    from stages import StageC
    from stages.diffusers_pipeline import write_combined_pipeline, write_prior_pipeline

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve_version(mlflow_client, model_uri)
    pinned = f"models:/{version.name}/{version.version}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download(pinned, tmp)
        config = registry.model_config(folder)
        stage_c = StageC.from_pretrained(registry.find_prior_folder(folder))
    text_c = TextEncoderRef.from_dict(config["text_encoder"]).load()
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    if config.get("decoders"):
        bundle: DecoderModel = mlflow.pyfunc.load_model(config["decoders"]).unwrap_python_model()
        write_combined_pipeline(staging, stage_c, text_c, bundle.stage_b.cpu(), bundle.text_encoder.cpu(), bundle.stage_a.cpu())
    else:
        write_prior_pipeline(staging, stage_c, text_c)
    (staging / "REGISTRY_SOURCE.txt").write_text(f"{pinned}\n{version.tags.get(registry.SOURCE_TAG, '')}\n")
    staging.rename(out)  # the folder appears complete or not at all
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wuerstchen export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = parser.parse_args(argv)
    try:
        out = export(args.model, args.out, args.tracking_uri, args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"wuerstchen export: {err}", file=sys.stderr)
        return 2
    print(f"wrote a diffusers pipeline folder for {args.model} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
