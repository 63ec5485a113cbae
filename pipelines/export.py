"""`python -m pipelines.export` / `wuerstchen export`: a registered Stage C version as a diffusers
pipeline folder.

    wuerstchen export --model models:/wuerstchen-stage-c@champion --out DIR [--adapter-only] [--tracking-uri URI]

DIR holds a `WuerstchenPriorPipeline` (prior/, text_encoder/, tokenizer/, scheduler/), or, when the
version references a decoder bundle, a `WuerstchenCombinedPipeline` with Stage B, Stage A and the
decoder's text encoder too. The referenced text encoders are materialised (their fingerprints are
checked first). A LoRA version is exported with its adapter merged into its pinned base, or with
`--adapter-only` as its adapter alone (pytorch_lora_weights.safetensors, which
`WuerstchenPriorPipeline.load_lora_weights(DIR)` takes on top of an export of the base). DIR is written beside itself and swapped in only once complete; `--overwrite` replaces
only a folder an earlier export wrote (it holds REGISTRY_SOURCE.txt), and a failed export leaves it as
it was.
"""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pipelines import registry
from pipelines.cli import job_parser, run_job

log = logging.getLogger(__name__)

# Written last into every exported folder: the registered version it came from. Its presence is what
# lets `--overwrite` replace a folder: only a folder an earlier export wrote is ever deleted.
MARKER = "REGISTRY_SOURCE.txt"


def _is_export(folder: Path) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text().startswith("models:/")


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuses, before anything is read or written, a target that the export may not replace."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder: choose a folder path")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise FileExistsError(f"--out {out} is the working directory or holds it: choose a folder of its own")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not _is_export(out):
        raise FileExistsError(
            f"--out {out} is not empty and was not written by `wuerstchen export` (it has no {MARKER}): "
            f"it is never replaced, not even with --overwrite; choose a new or empty folder"
        )
    if not overwrite:
        raise FileExistsError(f"--out {out} holds an earlier export: pass --overwrite to replace it")


def _swap_in(staging: Path, out: Path) -> None:
    """Puts the complete `staging` folder at `out`; an earlier export there is removed only afterwards."""
    if out.is_dir() and any(out.iterdir()):
        previous = out.with_name(f".{out.name}.previous")
        if previous.exists():
            shutil.rmtree(previous)
        out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous)
    else:
        staging.rename(out)  # an empty folder is replaced by rename(2) itself


def export(model_uri: str, out: str | Path, tracking_uri: str | None = None, overwrite: bool = False,
           adapter_only: bool = False) -> Path:
    import mlflow

    from pipelines.pyfunc_models import DecoderModel, TextEncoderRef
    from stages.diffusers_pipeline import write_combined_pipeline, write_prior_pipeline
    from stages.latents import latent_space

    out = Path(os.path.abspath(out))  # `--out .` gets a name, without following links
    _check_target(out, overwrite)
    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve_version(mlflow_client, model_uri)
    pinned = f"models:/{version.name}/{version.version}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download(pinned, tmp)
        config = registry.model_config(folder)
        if adapter_only:
            return _export_adapter(folder, config, out, overwrite, pinned, version)
        stage_c = registry.stage_c_in(folder)  # a LoRA version: merged into its base
    text_c = TextEncoderRef.from_dict(config["text_encoder"]).load()
    # Written beside the target and swapped in only when complete: a failed export leaves the earlier
    # one as it was.
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        if config.get("decoders"):
            bundle: DecoderModel = mlflow.pyfunc.load_model(config["decoders"]).unwrap_python_model()
            write_combined_pipeline(staging, stage_c, text_c, bundle.stage_b.cpu(), bundle.text_encoder.cpu(),
                                    bundle.stage_a.cpu(), registry.latent_space_of(config))
            space = latent_space(registry.latent_space_of(config))
            if registry.latent_space_of(config) != "v2":  # diffusers' combined pipeline assumes the v2 space
                log.warning("%s diffuses in the %s latent space: after WuerstchenCombinedPipeline.from_pretrained, call "
                            "pipe.prior_pipe.register_to_config(latent_mean=%s, latent_std=%s) (written in model_index.json "
                            "as prior_latent_mean / prior_latent_std); WuerstchenPriorPipeline reads them itself",
                            pinned, registry.latent_space_of(config), space.scale, space.shift)
        else:
            write_prior_pipeline(staging, stage_c, text_c, registry.latent_space_of(config))
        (staging / MARKER).write_text(f"{pinned}\n{version.tags.get(registry.SOURCE_TAG, '')}\n")
        _check_target(out, overwrite)  # again: the folder may have changed while the export ran
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _export_adapter(folder: Path, config: dict, out: Path, overwrite: bool, pinned: str, version) -> Path:
    """A LoRA version's adapter alone: out/pytorch_lora_weights.safetensors, which
    WuerstchenPriorPipeline.load_lora_weights(out) takes on top of an export of its base."""
    from stages import lora

    if not config.get("lora_base"):
        raise ValueError(f"{pinned} is not a LoRA version: it has no adapter to export alone (export it without --adapter-only)")
    files = sorted(Path(folder).rglob(lora.WEIGHTS_NAME))
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        shutil.copyfile(files[0], staging / lora.WEIGHTS_NAME)
        (staging / MARKER).write_text(f"{pinned}\n{version.tags.get(registry.SOURCE_TAG, '')}\nbase {config['lora_base']}\n")
        _check_target(out, overwrite)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported the adapter of %s (base %s): load it with WuerstchenPriorPipeline.load_lora_weights(%s) on an "
             "export of its base", pinned, config["lora_base"], out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("export", __doc__, {
        0: "written",
        1: "failed",
        2: "bad arguments: a malformed model URI, an --out that is a file, the working directory, or a "
           "folder an earlier export did not write (or did, without --overwrite)",
    })
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a folder an earlier export wrote (never any other)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="a LoRA version: write its adapter alone (pytorch_lora_weights.safetensors, for "
                             "WuerstchenPriorPipeline.load_lora_weights), not the pipeline with the adapter merged in")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = parser.parse_args(argv)

    def export_job() -> None:
        out = export(args.model, args.out, args.tracking_uri, args.overwrite, adapter_only=args.adapter_only)
        what = "the LoRA adapter" if args.adapter_only else "a diffusers pipeline folder"
        print(f"wrote {what} of {args.model} to {out}")

    return run_job("export", export_job)


if __name__ == "__main__":
    sys.exit(main())
