"""`python -m pipelines.register` / `wuerstchen register`: put a trained Stage C into the MLflow model
registry as a pyfunc model, as a new version of a named model with the alias `challenger`.

    wuerstchen register --run-id RUN            the newest checkpoint of a training run
    wuerstchen register --checkpoint URI        a checkpoint folder (local or s3://)
        [--name wuerstchen-stage-c] [--decoders models:/wuerstchen-decoders/1] [--tracking-uri URI]
        a Stage C version pins a decoder bundle version: --decoders as given (a URI, checked to be
        trained on the same semantic latents; or a bare NAME: its newest version trained on them),
        else the newest version of wuerstchen-decoders trained on them, if any;
        a Stage B checkpoint (model.stage b) becomes a new version of the decoder bundle
        (default name wuerstchen-decoders), with the Stage A and decoder text encoder of its cache;
        a Stage A checkpoint is refused: its ema/ is the encode.stage_a.path of a decoder cache
    wuerstchen register --decoder-bundle SOURCE [--flavor small] [--name wuerstchen-decoders]
        registers Stage B + Stage A once: SOURCE is a diffusers decoder pipeline folder or hub id
        (e.g. warp-ai/wuerstchen), or "random" for seeded random weights of the flavor (demos)

Registering the same checkpoint again returns the version it already has (no duplicate). The
version is tagged with the code version, the cache manifest fingerprint, the training run and step,
the validation loss of the registered (EMA) weights at that step and the encoder fingerprints.
"""

import logging
import sys
import tempfile
from pathlib import Path

from pipelines import registry
from pipelines.cli import job_parser, run_job
from pipelines.pyfunc_models import signature, text_encoder_ref
from stages import lora

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).resolve().parent / "model_code"
INPUT_EXAMPLE = ["a photo of a cat"]


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"wuerstchen-pipeline=={version('wuerstchen-pipeline')}"]


def _checkpoint(mlflow_client, run_id: str | None, checkpoint_uri: str | None):
    """(ray.train.Checkpoint, its URI) of a run's newest checkpoint or of the given folder."""
    from ray.train import Checkpoint

    from core.storage import join, resolve
    from pipelines.training import checkpoint as ckpt_io
    from pipelines.training.config import CheckpointConfig
    from pipelines.training.tracking import CONFIG_HASH_TAG, config_hash

    if checkpoint_uri:
        fs, path = resolve(checkpoint_uri)
        return Checkpoint(path=path, filesystem=fs), checkpoint_uri.rstrip("/")
    run = mlflow_client.get_run(run_id)
    try:
        storage, name = run.data.params["checkpoint.storage_path"], run.data.params["checkpoint.run_name"]
    except KeyError as err:
        raise ValueError(f"MLflow run {run_id} is not a training run of this project (no param {err})") from None
    found = ckpt_io.latest(CheckpointConfig(storage_path=storage, run_name=name))
    if found is None:
        raise FileNotFoundError(f"training run {run_id} ({join(storage, name)}) has no complete checkpoint")
    # The checkpoint folder is found by name: make sure this run wrote it, under this run's config,
    # or the version would pair one run's weights with another's metrics and config.
    state = ckpt_io.train_state_of(found)
    recorded = run.data.tags.get(CONFIG_HASH_TAG)
    if state.get("mlflow_run_id") != run_id or (recorded is not None and recorded != config_hash(state["config"])):
        raise ValueError(
            f"the newest checkpoint of training run {run_id}, {found.path}, was written by MLflow run "
            f"{state.get('mlflow_run_id')} with config hash {config_hash(state['config'])} (run {run_id}: {recorded}): it is "
            f"not this run's; register it with --checkpoint if it is the one you want"
        )
    return found, join(storage.rstrip("/"), name, Path(found.path).name)


def _stage_of(found) -> str:
    """The model.stage a checkpoint was trained as ("c" for one written before Stage B training existed)."""
    from pipelines.training import checkpoint as ckpt_io

    return ckpt_io.train_state_of(found).get("config", {}).get("model", {}).get("stage", "c")


def _download_weights(found, source: str, tmp: Path) -> tuple[dict, Path]:
    """(train_state, the folder of the weights to register: ema/, else model/) of a checkpoint, downloaded under `tmp`."""
    from pipelines.training import checkpoint as ckpt_io

    folder = Path(found.to_directory(str(tmp / "checkpoint")))
    state = ckpt_io.read_train_state(folder)
    weights = folder / "ema" if (folder / "ema").is_dir() else folder / "model"
    if not any((weights / sub / name).is_file() for sub, name in (("", "config.json"), ("decoder", "config.json"),
                                                                  ("", lora.WEIGHTS_NAME))):  # a model, Stage B + compressor, an adapter
        raise FileNotFoundError(f"checkpoint {source} holds neither ema/ nor model/ weights (a sharded-only checkpoint?)")
    return state, weights


def _set_challenger(mlflow_client, name: str, version) -> None:
    if "promotion.decision" not in version.tags:  # not yet through the gate: it is the candidate
        mlflow_client.set_registered_model_alias(name, registry.CHALLENGER, version.version)


def pinned_decoders(mlflow_client, decoders: str | None, semantic: str | None) -> str | None:
    """The decoder bundle version (models:/NAME/VERSION) a Stage C version pins, given a Stage C
    trained on latents of the semantic compressor of fingerprint `semantic`:
      - models:/NAME/VERSION or models:/NAME@ALIAS: that version (an alias resolved now: it could
        move), refused when its Stage B was trained on another semantic compressor's latents;
      - a bare NAME: the newest version of NAME trained on latents of this semantic compressor;
      - None: the same in the default bundle (wuerstchen-decoders), or none when it has no such version
        (random or downloaded bundles record no semantic compressor they were trained with)."""
    if decoders is not None and decoders.startswith("models:/"):
        bundle = registry.resolve_version(mlflow_client, decoders)
        theirs = bundle.tags.get("fingerprint.semantic_compressor")
        if theirs is not None and semantic is not None and theirs != semantic:
            raise ValueError(
                f"{decoders} (version {bundle.version}) has a Stage B trained on latents of the semantic compressor "
                f"{theirs}; this Stage C was trained on latents of {semantic}: its outputs would be a condition the "
                f"decoder never saw. Pin a bundle trained with the same semantic compressor"
            )
        return f"models:/{bundle.name}/{bundle.version}"
    name = decoders or registry.DECODERS_MODEL
    matching = [v for v in registry.versions(mlflow_client, name) if semantic and v.tags.get("fingerprint.semantic_compressor") == semantic]
    if matching:
        log.info("pinning %s version %s: its Stage B was trained on this Stage C's semantic latents", name, matching[-1].version)
        return f"models:/{name}/{matching[-1].version}"
    if decoders is not None:
        raise ValueError(f"no version of the decoder bundle {name} was trained on latents of this Stage C's semantic "
                         f"compressor ({semantic}): give a models:/ URI to pin another one")
    return None


def register_stage_c(
    tracking_uri: str | None = None,
    name: str = registry.STAGE_C_MODEL,
    run_id: str | None = None,
    checkpoint: str | None = None,
    decoders: str | None = None,
) -> dict:
    """Registers the EMA weights of a checkpoint; returns {"name", "version", "created", "source"}."""
    import mlflow

    from latent_cache.reader import Cache
    from latent_cache.spec import EncoderWeights
    from pipelines.training import checkpoint as ckpt_io

    if (run_id is None) == (checkpoint is None):
        raise ValueError("give exactly one of a training run id or a checkpoint URI")
    mlflow_client = registry.client(tracking_uri)
    found, source = _checkpoint(mlflow_client, run_id, checkpoint)
    stage = _stage_of(found)
    if stage != "c":
        raise ValueError(f"{source} is a checkpoint of Stage {stage.upper()}, not of Stage C: register it as a decoder "
                         f"bundle (`wuerstchen register --run-id/--checkpoint` finds the stage by itself)")
    existing = registry.find_version(mlflow_client, name, registry.SOURCE_TAG, source)
    if existing is not None:
        _set_challenger(mlflow_client, name, existing)
        log.info("%s is already registered as %s version %s", source, name, existing.version)
        return {"name": name, "version": existing.version, "created": False, "source": source}
    with tempfile.TemporaryDirectory() as tmp:
        state, weights = _download_weights(found, source, Path(tmp))
        decoders = pinned_decoders(mlflow_client, decoders, state["cache_fingerprints"].get("semantic_compressor"))
        config = state["config"]
        cache = Cache(config["data"]["cache"])
        encoders = config["encoders"]
        text_ref = text_encoder_ref(config["model"]["flavor"], EncoderWeights(**encoders["text_encoder"]), encoders["text_width"])
        trained_with = state["cache_fingerprints"].get("text_encoder")
        if text_ref.fingerprint != trained_with:
            raise ValueError(
                f"the text encoder of this checkpoint's config has fingerprint {text_ref.fingerprint}, but it was "
                f"trained on a cache of text encoder {trained_with}"
            )
        train_run = state.get("mlflow_run_id") or run_id
        model_config = {
            "flavor": config["model"]["flavor"],
            "resolution": cache.manifest["resolution"],
            # the image shapes ("HxW", aspect-ratio buckets) it was trained on; params height and width ask for any
            "buckets": list(cache.buckets),
            "text_mode": cache.manifest["text_mode"],
            "text_encoder": text_ref.to_dict(),
            "decoders": decoders,
            # the space the prior diffuses in (stages.latents.LATENT_SPACES); its sampler maps back from it
            "latent_space": config["objective"].get("latent_space", "v2"),
            "eval_spec": {"cache": config["data"]["cache"], "validation_fraction": config["data"]["validation_fraction"],
                          "t_grid": list(config["validation"]["t_grid"]), "seed": config["validation"]["seed"],
                          "p2_weighting": config["objective"]["p2_weighting"],
                          **{k: config["validation"][k] for k in ("retrieval_steps", "retrieval_guidance")
                             if k in config["validation"]}},
        }
        tags = {
            registry.SOURCE_TAG: source,
            "code_version": registry.code_version(),
            "cache.url": config["data"]["cache"],
            "cache.manifest_fingerprint": registry.cache_fingerprint(cache.manifest),
            "training.run_id": train_run or "",
            "training.step": str(state["step"]),
            "weights": weights.name,
            registry.LATENT_SPACE_TAG: config["objective"].get("latent_space", "v2"),
            **{f"fingerprint.{k}": v for k, v in state["cache_fingerprints"].items()},
        }
        if decoders:
            tags["decoders"] = decoders
        base = state.get("lora_base")
        if base is not None:  # a LoRA fine-tune: the version holds the adapter and pins its base
            if not base.get("version"):
                raise ValueError(f"{source} holds a LoRA adapter of model.init={base['init']}, which is not a registered "
                                 f"version: a registered adapter pins its base, so register the base and fine-tune from "
                                 f"its models:/ URI (or export the merged weights)")
            model_config["lora_base"] = tags["lora.base"] = base["version"]
            tags["lora.base_sha256"] = base["sha256"]
        # What the registered weights themselves scored at this checkpoint's step (not the newest
        # figure of the run, nor that of the other weights); absent when the step was not validated.
        suffix = ckpt_io.VAL_LOSS[weights.name].removeprefix("val_loss")  # _ema or _raw
        for key, value in state.get("validation", {}).items():  # val_loss, val_train_retrieval_top10, ...
            if key.endswith(suffix):
                tags[f"training.{key.removesuffix(suffix)}"] = f"{value:.6g}"
        run_context = mlflow.start_run(run_id=train_run) if train_run else mlflow.start_run(run_name=f"register-{name}")
        with run_context:
            info = mlflow.pyfunc.log_model(
                name="stage_c", python_model=str(MODEL_CODE / "stage_c.py"), artifacts={"prior": str(weights)},
                model_config=model_config, signature=signature(), input_example=(INPUT_EXAMPLE, {"steps": 2}),
                pip_requirements=_pip_requirements(),
            )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    mlflow_client.set_registered_model_alias(name, registry.CHALLENGER, version.version)
    log.info("registered %s version %s from %s", name, version.version, source)
    return {"name": name, "version": version.version, "created": True, "source": source}


def random_decoders(flavor: str, seed: int = 0, text_weights=None):
    """Seeded random Stage B + Stage A of a flavor, and the decoder text encoder of `text_weights`
    (default: random with the same seed): what the demo registered before it had trained decoders,
    and the baseline the trained ones are measured against."""
    import torch

    from latent_cache.encoders import build_decoder_text_encoder
    from latent_cache.spec import EncoderWeights
    from stages import StageA, StageB

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stage_b, stage_a = StageB.from_flavor(flavor), StageA.from_flavor(flavor)
    text = build_decoder_text_encoder(flavor, text_weights or EncoderWeights(None, seed), stage_b.config.clip_embd)
    return stage_b, stage_a, text


def register_decoders(
    tracking_uri: str | None = None,
    name: str = registry.DECODERS_MODEL,
    source: str = "random",
    flavor: str = "small",
    seed: int = 0,
) -> dict:
    """Registers Stage B + Stage A (+ the reference of their text encoder) once; the same weights
    registered again return the existing version. `source`: "random" (seeded `flavor` weights), a
    bundle folder with a bundle.json (see `pipelines.decoder_bundle`: the demo decoders; its
    fingerprints and figures become tags, so Stage C versions trained on the same semantic
    compressor pin it), or a diffusers folder / hub id."""
    from latent_cache.spec import EncoderWeights
    from latent_cache.encoders import weights_digest
    from pipelines import decoder_bundle
    from stages import StageA, StageB

    mlflow_client = registry.client(tracking_uri)
    tags, compressor = {}, None
    meta = decoder_bundle.read_meta(source) if source != "random" else None
    if source == "random":
        stage_b, stage_a, text = random_decoders(flavor, seed)
        text_ref = text_encoder_ref(flavor, EncoderWeights(None, seed), stage_b.config.clip_embd, text)
    elif meta is not None:
        stage_b, stage_a, text, meta = decoder_bundle.load(source)
        flavor = meta["flavor"]
        text_ref = text_encoder_ref(flavor, decoder_bundle.text_encoder_weights(meta), stage_b.config.clip_embd, text)
        tags = {f"fingerprint.{k}": v for k, v in meta["fingerprints"].items()}
        figures = meta.get("reconstruction", {}).get("figures", {})
        tags.update({f"reconstruction.{k}": str(v["trained"]) for k, v in figures.items()})
        tags.update({f"training.{stage}.step": str(run["step"]) for stage, run in meta.get("training", {}).items()})
        compressor = decoder_bundle.load_semantic_compressor(source)
        if compressor is not None:
            tags["semantic_compressor"] = COMPRESSOR_TAG
    else:
        stage_b = StageB.from_pretrained(source, subfolder="decoder")
        stage_a = StageA.from_pretrained(source, subfolder="vqgan")
        text_ref = text_encoder_ref(flavor, EncoderWeights(source, seed), None)
    digest = f"{weights_digest(stage_b)[:16]}-{weights_digest(stage_a)[:16]}-{text_ref.fingerprint[:16]}"
    if compressor is not None:
        digest += f"-{weights_digest(compressor)[:16]}"
    existing = registry.find_version(mlflow_client, name, registry.SOURCE_TAG, digest)
    if existing is not None:
        return {"name": name, "version": existing.version, "created": False, "source": source}
    described = {"random": "seeded random weights (demo)"}.get(source, f"trained: {meta['command']}" if meta else source)
    return _log_decoder_bundle(name, stage_b, stage_a, text_ref, flavor, source, {
        registry.SOURCE_TAG: digest, "weights": described, "flavor": flavor, "code_version": registry.code_version(), **tags,
    }, semantic_compressor=compressor)


# The tag of a decoder bundle version that carries its own semantic compressor.
COMPRESSOR_TAG = ("trained with Stage B: the artifact decoders/semantic_compressor, which the prior's cache must be "
                  "made with (prep encode.semantic.path)")


def _log_decoder_bundle(name: str, stage_b, stage_a, text_ref, flavor: str, source: str, tags: dict,
                        run_id: str | None = None, semantic_compressor=None) -> dict:
    """Logs Stage B + Stage A (+ the reference of the decoder's text encoder, + the semantic
    compressor when it was trained with Stage B) as a pyfunc model, in `run_id` (the training run)
    or a run of its own, and registers it as a new version of `name`."""
    import mlflow

    from stages.stage_b_with_compressor import COMPRESSOR_FOLDER

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "decoders"
        stage_b.save_pretrained(folder / "decoder")
        stage_a.save_pretrained(folder / "vqgan")
        if semantic_compressor is not None:  # what the prior's cache must be made with (encode.semantic.path)
            semantic_compressor.save_pretrained(folder / COMPRESSOR_FOLDER)
        model_config = {"flavor": flavor, "text_encoder": text_ref.to_dict()}
        with mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=f"register-{name}"):
            info = mlflow.pyfunc.log_model(
                name="decoders", python_model=str(MODEL_CODE / "decoders.py"), artifacts={"decoders": str(folder)},
                model_config=model_config, pip_requirements=_pip_requirements(),
            )
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    log.info("registered %s version %s from %s", name, version.version, source)
    return {"name": name, "version": version.version, "created": True, "source": source}


def _merged_stage_b(state: dict, weights: Path):
    """A Stage B LoRA checkpoint's adapter merged into its base (diffusers has no LoRA loader for the
    decoder, and a bundle holds its Stage B whole); the base checked to be the one it was trained on."""
    from core.config import from_dict
    from latent_cache.encoders import state_digest
    from pipelines.train import initial_weights
    from pipelines.training.config import TrainConfig
    from stages import StageB

    cfg = from_dict(TrainConfig, state["config"], "the checkpoint's config")
    base = initial_weights(cfg)
    if state_digest(base) != state["lora_base"]["sha256"]:
        raise ValueError(f"model.init={cfg.model.init} now gives other weights than the base this Stage B adapter was trained on")
    stage_b = StageB(cfg.model.model_config())
    stage_b.load_state_dict(base)
    adapter, spec, _ = lora.load(weights)
    return lora.merge_into(stage_b, adapter, spec)


def register_trained_decoder(tracking_uri: str | None = None, name: str = registry.DECODERS_MODEL,
                             run_id: str | None = None, checkpoint: str | None = None) -> dict:
    """Registers a trained Stage B checkpoint's EMA weights (a LoRA's: merged into its base) as a new
    version of the decoder bundle, with the Stage A and the decoder text encoder its cache was made with (both checked against the
    fingerprints the checkpoint recorded), tagged with the training run, step and validation loss."""
    from latent_cache.encoders import build_stage_a, decoder_text_width, model_fingerprint
    from latent_cache.spec import EncoderWeights
    from pipelines.training import checkpoint as ckpt_io
    from stages import StageB
    from stages.stage_b_with_compressor import COMPRESSOR_FOLDER, StageBWithCompressor

    if (run_id is None) == (checkpoint is None):
        raise ValueError("give exactly one of a training run id or a checkpoint URI")
    mlflow_client = registry.client(tracking_uri)
    found, source = _checkpoint(mlflow_client, run_id, checkpoint)
    if _stage_of(found) != "b":
        raise ValueError(f"{source} is not a checkpoint of Stage B")
    existing = registry.find_version(mlflow_client, name, registry.SOURCE_TAG, source)
    if existing is not None:
        return {"name": name, "version": existing.version, "created": False, "source": source}
    with tempfile.TemporaryDirectory() as tmp:
        state, weights = _download_weights(found, source, Path(tmp))
        config, trained_with = state["config"], dict(state["cache_fingerprints"])
        compressor = None
        if config["model"].get("train_semantic_compressor"):
            joint = StageBWithCompressor.from_pretrained(weights)
            stage_b, compressor = joint.stage_b, joint.semantic_compressor
            # Stage B learned the latents of this compressor, not of the one the cache was made with.
            trained_with["semantic_compressor"] = model_fingerprint(
                "semantic_compressor", compressor, EncoderWeights(f"{source}/{weights.name}/{COMPRESSOR_FOLDER}"))["fingerprint"]
        elif state.get("lora_base") is not None:
            stage_b = _merged_stage_b(state, weights)
        else:
            stage_b = StageB.from_pretrained(weights)
    flavor, encoders = config["model"]["flavor"], config["encoders"]
    stage_a_weights = EncoderWeights(**encoders["stage_a"])
    stage_a = build_stage_a(flavor, stage_a_weights)
    width = decoder_text_width(flavor, encoders["decoder_text_width"])
    text_ref = text_encoder_ref(flavor, EncoderWeights(**encoders["decoder_text_encoder"]), width)
    for what, fingerprint in (("stage_a", model_fingerprint("stage_a", stage_a, stage_a_weights)["fingerprint"]),
                              ("decoder_text_encoder", text_ref.fingerprint)):
        if fingerprint != trained_with.get(what):
            raise ValueError(f"the {what} of this checkpoint's config has fingerprint {fingerprint}, but it was trained on "
                             f"a cache of {what} {trained_with.get(what)}")
    train_run = state.get("mlflow_run_id") or run_id
    tags = {
        registry.SOURCE_TAG: source, "weights": f"trained: {source} ({weights.name})", "flavor": flavor,
        "code_version": registry.code_version(), "training.run_id": train_run or "", "training.step": str(state["step"]),
        **{f"fingerprint.{k}": v for k, v in trained_with.items()},
    }
    val_loss = state.get("validation", {}).get(ckpt_io.VAL_LOSS[weights.name])
    if val_loss is not None:
        tags["training.val_loss"] = f"{val_loss:.6g}"
    if compressor is not None:
        tags["semantic_compressor"] = COMPRESSOR_TAG
    return _log_decoder_bundle(name, stage_b, stage_a, text_ref, flavor, source, tags, run_id=train_run,
                               semantic_compressor=compressor)


def register_checkpoint(tracking_uri: str | None = None, name: str | None = None, run_id: str | None = None,
                        checkpoint: str | None = None, decoders: str | None = None) -> dict:
    """Registers a training run's newest checkpoint (or a checkpoint folder) as what it was trained
    as: a Stage C version, or (model.stage b) a decoder bundle version."""
    if (run_id is None) == (checkpoint is None):
        raise ValueError("give exactly one of a training run id or a checkpoint URI")
    found, source = _checkpoint(registry.client(tracking_uri), run_id, checkpoint)
    stage = _stage_of(found)  # one read of its train_state (on S3, a request)
    if stage == "a":
        raise ValueError(
            f"{source} is a Stage A checkpoint: a Stage A is registered inside a decoder bundle, with the Stage B "
            f"trained on its latents. Prepare a decoder cache with encode.stage_a.path set to the checkpoint's ema/ "
            f"folder (downloaded, if on S3), train Stage B on it, and register that Stage B checkpoint"
        )
    if stage == "b":
        if decoders:
            raise ValueError("--decoders names the decoder bundle of a Stage C version; this checkpoint is a Stage B")
        return register_trained_decoder(tracking_uri, name or registry.DECODERS_MODEL, run_id, checkpoint)
    return register_stage_c(tracking_uri, name or registry.STAGE_C_MODEL, run_id, checkpoint, decoders)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("register", __doc__, {
        0: "registered (or already there)",
        1: "failed",
        2: "bad arguments or inputs",
    })
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run-id", help="MLflow run id of a training run (its newest checkpoint is registered)")
    what.add_argument("--checkpoint", help="a checkpoint folder, local or s3://")
    what.add_argument("--decoder-bundle", metavar="SOURCE", help='register decoders: a bundle folder (weights/twemoji-small-decoders), a decoder pipeline folder / hub id, or "random"')
    parser.add_argument("--name", help=f"registered model name (default {registry.STAGE_C_MODEL}, or {registry.DECODERS_MODEL} for a decoder bundle)")
    parser.add_argument("--decoders", help="the decoder bundle this Stage C version pins: models:/wuerstchen-decoders/1, or a "
                        "bundle name (its newest version trained on the same semantic latents); default: that of wuerstchen-decoders")
    parser.add_argument("--flavor", default="small", help="decoder bundle only: the flavor of random weights / text encoder")
    parser.add_argument("--seed", type=int, default=0, help="decoder bundle only: seed of random weights")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = parser.parse_args(argv)

    def register() -> None:
        if args.decoder_bundle:
            out = register_decoders(args.tracking_uri, args.name or registry.DECODERS_MODEL, args.decoder_bundle, args.flavor, args.seed)
        else:
            out = register_checkpoint(args.tracking_uri, args.name, args.run_id, args.checkpoint, args.decoders)
        state = "registered" if out["created"] else "already registered as"
        print(f"{state} models:/{out['name']}/{out['version']} (from {out['source']})")

    return run_job("register", register)


if __name__ == "__main__":
    sys.exit(main())
