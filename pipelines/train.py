"""`python -m pipelines.train --config FILE [--set key=value ...]` / `wuerstchen train ...`: train
Stage C (or, with model.stage=b, Stage B on the cache's Stage A latents; with model.stage=a, Stage A
on the cache's images) with Ray Train (DDP or FSDP2), checkpointing to local disk or S3 and tracking
in MLflow.

Rerunning the same command (same checkpoint.run_name and storage_path) resumes from the newest
complete checkpoint, with more steps if `steps` was raised; a worker failure is retried from the
newest checkpoint up to `max_failures` times. A run name is one config: rerunning it with a value
changed that defines the run (anything but tracking.RESUMABLE_KEYS) is refused.
"""

import dataclasses
import logging
import sys

from core.config import load
from pipelines.cli import add_config_arguments, job_parser, run_job
from pipelines.training.config import TrainConfig

log = logging.getLogger(__name__)


def expected_fingerprints(cfg: TrainConfig):
    """The fingerprints of the encoders this model goes with (name -> fingerprint), and the text
    encoder whose width the model must take (Stage C: the prior's, which also encodes "";
    Stage B: the decoder's; Stage A learns the images themselves: none and None)."""
    from latent_cache.encoders import model_fingerprint, text_fingerprint

    enc, flavor = cfg.encoders, cfg.model.flavor
    if cfg.model.stage == "a":
        return {}, None
    expected = {}
    if not cfg.model.train_semantic_compressor:  # (trained with Stage B, it reads images, not the cache's z_C)
        semantic = enc.build_semantic_compressor(flavor)
        expected["semantic_compressor"] = model_fingerprint("semantic_compressor", semantic, enc.semantic)["fingerprint"]
    if cfg.model.stage == "b":
        text = enc.build_decoder_text_encoder(flavor)
        stage_a = enc.build_stage_a(flavor)
        check_scale_factor(cfg.decoder_objective.scale_factor, stage_a.config.scale_factor)
        expected["stage_a"] = model_fingerprint("stage_a", stage_a, enc.stage_a)["fingerprint"]
        expected["decoder_text_encoder"] = text_fingerprint(text, enc.decoder_text_encoder)["fingerprint"]
    else:
        text = enc.build_text_encoder(flavor)
        expected["text_encoder"] = text_fingerprint(text, enc.text_encoder)["fingerprint"]
    return expected, text


def initial_weights(cfg: TrainConfig):
    """The state dict to start from (None: from scratch). Stage B trained with its semantic
    compressor starts from the compressor of encoders.semantic (the one the frozen path would use)
    and from model.init's Stage B, if any."""
    if cfg.model.train_semantic_compressor:
        from stages import StageB

        compressor = cfg.encoders.build_semantic_compressor(cfg.model.flavor)
        stage_b = _stage_weights(cfg.model.init, StageB, cfg) or {}
        return {**{f"semantic_compressor.{k}": v for k, v in compressor.state_dict().items()},
                **{f"stage_b.{k}": v for k, v in stage_b.items()}}
    return _stage_weights(cfg.model.init, cfg.model.model_class, cfg)


def _stage_weights(init: str | None, model_class, cfg: TrainConfig):
    """The state dict of a `model_class` from model.init (None: none given)."""
    if not init:
        return None
    if init.startswith("models:/"):  # a Stage C version's prior, or the Stage B / Stage A of a decoder bundle
        from pipelines.registry import latent_space_of, load_registered, model_config_of
        from pipelines.training.tracking import tracking_uri

        weights = load_registered(init, model_class, tracking_uri(cfg.tracking.tracking_uri)).state_dict()
        theirs = latent_space_of(model_config_of(init)) if cfg.model.stage == "c" else None
        if theirs is not None and theirs != cfg.objective.latent_space:
            raise ValueError(f"model.init={init} diffuses in the latent space {theirs!r}, this run in "
                             f"objective.latent_space={cfg.objective.latent_space!r}: fine-tune it in its own")
        return weights
    if init.endswith((".pt", ".pth", ".ckpt")):
        from stages.original_format import load_original

        return load_original(model_class, init, flavor=cfg.model.flavor, config=model_class.flavor_config(
            cfg.model.flavor, **cfg.model.overrides)).state_dict()
    return model_class.from_pretrained(init).state_dict()


def check_scale_factor(objective: float, stage_a: float) -> None:
    """Stage B learns z_B = h / scale_factor and the sampler decodes z_B * the Stage A's own
    scale_factor (its config): trained with another factor, every decoded image would be off in scale."""
    if abs(objective - stage_a) > 1e-6:
        raise ValueError(
            f"decoder_objective.scale_factor={objective}, but the Stage A of encoders.stage_a has scale_factor={stage_a} "
            f"(its config.json), which the sampler decodes Stage B's latents with: set decoder_objective.scale_factor={stage_a}"
        )


def row_bytes(cache, columns: list[str], bucket: str | None = None) -> int:
    """An upper bound of one row's bytes in a batch (of a bucket): 4 bytes for each value of the tensor columns."""
    import math

    shapes = cache.buckets[bucket]["shapes"] if bucket else cache.manifest["shapes"]
    return sum(4 * math.prod(shapes.get(name, [1])) for name in columns)


def worker_share(cfg: TrainConfig, cache, columns: list[str], per_worker: float, bucket: str | None = None) -> tuple[float, bool]:
    """(the megabytes of a worker's `per_worker` training rows (of a bucket), whether the worker holds
    them in memory: within data.memory_limit_mb, it reads them once instead of every epoch)."""
    megabytes = per_worker * row_bytes(cache, columns, bucket) / 2**20
    return megabytes, megabytes <= cfg.data.memory_limit_mb


def reads_in_process(cfg: TrainConfig, cache, columns: list[str]) -> bool:
    """Whether each worker reads its rows, its share of the training rows and the held-out rows,
    straight from the cache's files (pyarrow, in its own process: rows.worker_rows) rather than
    through Ray Datasets: when the whole cache's `columns` are within data.memory_limit_mb (a
    worker reads every file, keeping its share and the held-out rows). No Ray Data tasks, no split
    coordinator, no dataset shards: on a small cache these take far longer than the read (new worker
    processes, each importing its modules)."""
    megabytes = sum(info["rows"] * row_bytes(cache, columns, bucket) for bucket, info in cache.buckets.items()) / 2**20
    return megabytes <= cfg.data.memory_limit_mb


def build_task(cfg: TrainConfig, cache, text_encoder):
    """The training task of `cfg.model.stage` for this cache, after checking that the model takes
    the text encoder's width."""
    from pipelines.training.tasks import STAGE_A_COLUMNS, STAGE_B_WITH_COMPRESSOR_COLUMNS, StageATask, StageBTask, StageCTask

    if cfg.model.stage == "a":
        cache.check_columns(STAGE_A_COLUMNS, "Stage A training")
        crop, resolution = cfg.vqgan_objective.crop, cache.manifest["resolution"]
        if crop is not None and crop > resolution:
            raise ValueError(f"vqgan_objective.crop={crop} is larger than the images of {cfg.data.cache} ({resolution} px)")
        return StageATask(cfg.model, cfg.vqgan_objective)
    if cfg.model.stage == "b":
        width, name = cfg.model.stage_b_config().clip_embd, "clip_embd"
    else:
        width, name = cfg.model.model_config().c_cond, "c_cond"
    if text_encoder.width != width:
        raise ValueError(f"the model takes text tokens of width {name}={width}; the text encoder gives {text_encoder.width}")
    if cfg.model.stage == "b":
        if cfg.model.train_semantic_compressor:
            cache.check_columns(STAGE_B_WITH_COMPRESSOR_COLUMNS, "Stage B training with model.train_semantic_compressor")
        return StageBTask(cfg.model, cfg.decoder_objective, cfg.validation)
    return StageCTask(cfg.model, cfg.encoders, cfg.objective, cfg.validation, cache.manifest["text_mode"],
                      empty_text=text_encoder.encode([""])[0].cpu().numpy(), train_probe=train_probe(cfg, cache),
                      decoders=picture_decoders(cfg, cache))


def train_probe(cfg: TrainConfig, cache, bucket: str | None = None) -> dict | None:
    """The training rows whose captions Stage C's validation retrieval samples (see
    StageCTask.retrieval), spread over the cache (or a bucket of it), as a numpy batch; None when it
    is off or the cache has several buckets (each bucket's are in TrainPlan.buckets)."""
    from pipelines.training.tasks import probe_rows

    v = cfg.validation
    count = max(v.retrieval_captions, v.picture_captions if v.decoders else 0)
    if not count or (bucket is None and len(cache.buckets) > 1):
        return None
    return probe_rows(cache, count, cfg.data.validation_fraction, bucket)


def mixed_rows(cache, shards: list[str] | None, replay_fraction: float) -> dict[str, float]:
    """bucket -> the rows training draws from: all of them, or with data.shards the rows of those
    source shards plus `replay_fraction` of the others, counted bucket by bucket from the manifest's
    per-shard counts (a cache of one bucket, or written before it had them: the shards' rows
    spread as the cache's)."""
    totals = {bucket: float(info["rows"]) for bucket, info in cache.buckets.items()}
    if shards is None:
        return totals
    stats = [cache.manifest["shards"][s] for s in shards]
    if all("buckets" in s or not s["rows_written"] for s in stats):
        new = {bucket: float(sum(s.get("buckets", {}).get(bucket, 0) for s in stats)) for bucket in totals}
    else:
        written = sum(s["rows_written"] for s in stats)
        new = {bucket: written * total / cache.rows for bucket, total in totals.items()}
    return {bucket: new[bucket] + (totals[bucket] - new[bucket]) * replay_fraction for bucket in totals}


def bucket_plan(cfg: TrainConfig, cache, columns: list[str], rows: dict[str, float]) -> dict[str, dict] | None:
    """For a cache of several aspect-ratio buckets: bucket -> its estimated training rows per worker
    ("rows"), whether it is trained on (a worker's share holds a batch) and held in memory, and its
    Stage C probe rows; None for a cache of one bucket. `rows`: bucket -> the rows training draws
    from (`mixed_rows`)."""
    if len(cache.buckets) == 1:
        return None
    share = (1 - cfg.data.validation_fraction) / cfg.parallel.num_workers
    plan = {}
    for bucket in cache.buckets:
        per_worker = rows[bucket] * share
        plan[bucket] = {"rows": per_worker, "trained": per_worker >= cfg.data.batch_size,
                        "in_memory": worker_share(cfg, cache, columns, per_worker, bucket)[1],
                        "probe": train_probe(cfg, cache, bucket) if cfg.model.stage == "c" else None}
    skipped = [b for b, p in plan.items() if not p["trained"]]
    if len(skipped) == len(plan):
        raise ValueError(f"no bucket of {cfg.data.cache} gives each of {cfg.parallel.num_workers} workers data.batch_size="
                         f"{cfg.data.batch_size} training rows: {({b: round(p['rows']) for b, p in plan.items()})}")
    if skipped:
        log.warning("buckets %s give each worker fewer than data.batch_size=%d training rows: validated, not trained on",
                    skipped, cfg.data.batch_size)
    return plan


def picture_decoders(cfg: TrainConfig, cache) -> str | None:
    """validation.decoders as an absolute path (a worker runs elsewhere), after checking that it is a
    decoder bundle whose Stage B learned this cache's semantic latents (else its pictures of them
    would mean nothing)."""
    from pathlib import Path

    from pipelines import decoder_bundle

    if not cfg.validation.decoders:
        return None
    folder = Path(cfg.validation.decoders).resolve()
    meta = decoder_bundle.read_meta(folder)
    if meta is None:
        raise ValueError(f"validation.decoders={cfg.validation.decoders!r} is not a decoder bundle folder (no bundle.json)")
    theirs, ours = meta["fingerprints"].get("semantic_compressor"), cache.fingerprints().get("semantic_compressor")
    if theirs != ours:
        raise ValueError(f"validation.decoders={cfg.validation.decoders!r}: its Stage B learned the latents of the semantic "
                         f"compressor {theirs}, the cache {cfg.data.cache} holds those of {ours}")
    return str(folder)


def lora_base_of(cfg: TrainConfig, init_state: dict | None, resumed: dict | None, uri: str, run_id: str) -> dict | None:
    """A LoRA run's base: model.init, the sha256 of its weights and, for a registered base, the
    version it resolved to (models:/NAME/VERSION: what a registered adapter pins, an alias being
    able to move), recorded in every checkpoint and as MLflow tags. A resume whose model.init now
    gives other weights (an alias moved, a folder rewritten) is refused: the adapter was trained
    on the first."""
    if cfg.model.lora is None:
        return None
    from mlflow import MlflowClient

    from latent_cache.encoders import state_digest

    sha = state_digest(init_state)
    recorded = (resumed or {}).get("lora_base")
    if recorded is not None:
        if recorded["sha256"] != sha:
            raise ValueError(f"model.init={cfg.model.init} now gives other weights (sha256 {sha[:12]}) than the base the "
                             f"adapter of {cfg.checkpoint.run_name} was trained on ({recorded['sha256'][:12]}): resume with "
                             f"that base, or start a new run_name")
        return recorded
    client, version = MlflowClient(uri), None
    if cfg.model.init.startswith("models:/"):
        from pipelines import registry

        found = registry.resolve_version(client, cfg.model.init)
        version = f"models:/{found.name}/{found.version}"
    base = {"init": cfg.model.init, "sha256": sha, "version": version}
    client.set_tag(run_id, "lora.base", version or cfg.model.init)
    client.set_tag(run_id, "lora.base_sha256", sha)
    return base


def run_training(cfg: TrainConfig):
    """Trains; returns (ray.train.Result, the MLflow run id)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from latent_cache.reader import Cache
    from pipelines.training import checkpoint as ckpt_io
    from pipelines.training.rows import data_config, datasets
    from pipelines.training.loop import train_func
    from pipelines.training.plan import TrainPlan
    from pipelines.training.tracking import start_or_resume_run, tracking_uri
    from pipelines.plan import check_fits

    cache = Cache(cfg.data.cache)
    expected, text_encoder = expected_fingerprints(cfg)
    cache.check_fingerprints(expected)  # refused here, before any worker starts
    check_fits(cfg)  # and a run its devices cannot hold
    task = build_task(cfg, cache, text_encoder)
    if cfg.data.shards is not None:
        unknown = sorted(set(cfg.data.shards) - set(cache.manifest["shards"]))
        if unknown:
            raise ValueError(f"data.shards names shards the cache at {cfg.data.cache} does not hold: {unknown[:3]}")
    rows = mixed_rows(cache, cfg.data.shards, cfg.data.replay_fraction)
    per_worker = sum(rows.values()) * (1 - cfg.data.validation_fraction) / cfg.parallel.num_workers
    buckets = bucket_plan(cfg, cache, task.columns, rows)
    if buckets is None and per_worker < cfg.data.batch_size:
        raise ValueError(
            f"each of {cfg.parallel.num_workers} workers would get about {per_worker:.0f} training rows of {cfg.data.cache}, "
            f"fewer than data.batch_size={cfg.data.batch_size}"
        )
    uri = tracking_uri(cfg.tracking.tracking_uri)
    config_dict = dataclasses.asdict(cfg)
    resume = ckpt_io.latest(cfg.checkpoint)
    owner = None
    if resume is not None:
        resumed = ckpt_io.train_state_of(resume)
        check_resumable(resumed["config"], config_dict, resume.path)
        owner = resumed["mlflow_run_id"]
        log.info("resuming %s from %s", cfg.checkpoint.run_name, resume.path)
    run_id = start_or_resume_run(
        uri, cfg.tracking.experiment, cfg.checkpoint.run_name, config_dict,
        tags={"cache": cfg.data.cache, **{f"fingerprint.{k}": v for k, v in expected.items()}}, owner=owner,
    )
    _log_manifest(uri, run_id, cache)

    from core.ray_cluster import connect
    from core.storage import absolute

    connect(cfg.ray_address, cfg.num_cpus)
    split = (cfg.data.validation_fraction, cfg.data.shards, cfg.data.replay_fraction, cfg.seed)
    cache_in_process = absolute(cfg.data.cache) if reads_in_process(cfg, cache, task.columns) else None
    all_datasets, trained, in_memory = {}, [], False
    if buckets is None:
        share_mb, in_memory = worker_share(cfg, cache, task.columns, per_worker)
        how = "reads from the cache's files" if cache_in_process else "holds in memory" if in_memory else "streams"
        log.info("each worker %s its ~%.0f training rows (~%.0f MB)", how, per_worker, share_mb)
        if cache_in_process is None:
            all_datasets["train"], all_datasets["val"] = datasets(cache, task.columns, *split)
            trained = ["train"]
    else:  # a dataset of each bucket: a batch is of one bucket's shapes
        for bucket, info in buckets.items():
            if cache_in_process is None:
                train_ds, all_datasets[f"val_{bucket}"] = datasets(cache, task.columns, *split, bucket=bucket)
                if info["trained"]:
                    all_datasets[f"train_{bucket}"] = train_ds
                    trained.append(f"train_{bucket}")
        log.info("aspect-ratio buckets, training rows per worker: %s",
                 ", ".join(f"{b} ~{p['rows']:.0f}{'' if p['trained'] else ' (not trained on)'}" for b, p in buckets.items()))
    # A LoRA fine-tune's checkpoints hold its adapter only: a resume needs the base again, the same one.
    init_state = initial_weights(cfg) if resume is None or cfg.model.lora is not None else None
    lora_base = lora_base_of(cfg, init_state, ckpt_io.train_state_of(resume) if resume is not None else None, uri, run_id)
    plan = TrainPlan(cfg, task, uri, run_id, cache.fingerprints(), init_state=init_state, in_memory=in_memory,
                     lora_base=lora_base, buckets=buckets, cache_in_process=cache_in_process)
    fs, root = cfg.checkpoint.storage()
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if cfg.parallel.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.parallel.num_workers, use_gpu=cfg.parallel.use_gpu,
            resources_per_worker={"CPU": cfg.parallel.cpus_per_worker, **({"GPU": 1} if cfg.parallel.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.checkpoint.run_name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
        datasets=all_datasets or None,  # none: the workers read the cache in process
        dataset_config=data_config(trained) if all_datasets else None,
    )
    try:
        result = trainer.fit()
    except Exception:
        _end_run(uri, run_id, "FAILED")
        raise
    _end_run(uri, run_id, "FINISHED")
    return result, run_id


def check_resumable(saved: dict, config: dict, where: str) -> None:
    """Refuses (ConfigError) to resume a checkpoint trained under another config: its weights would
    go on under values they were not trained with, in the same run."""
    import json

    from core.config import ConfigError
    from pipelines.training.tracking import RESUMABLE_KEYS, config_changes, config_hash, flatten

    if config_hash(saved) != config_hash(config) and (changes := config_changes(flatten(saved), json.loads(json.dumps(config)))):
        raise ConfigError(
            f"checkpoint {where} was trained with another config ({'; '.join(changes[:10])}): give this config a new "
            f"checkpoint.run_name, or restore those values to resume it (only {', '.join(RESUMABLE_KEYS)} may change)"
        )


def _log_manifest(uri: str, run_id: str, cache) -> None:
    import json
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache_manifest.json"
        path.write_text(json.dumps(cache.manifest, indent=2))
        MlflowClient(uri).log_artifact(run_id, str(path))


def _end_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).set_terminated(run_id, status=status)
    except Exception as err:  # the result of training matters more than the run's status
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("train", __doc__, {
        0: "done (also when the run had already reached `steps`)",
        1: "training failed",
        2: "bad configuration, including a cache made by other encoders, a missing cache, or a run name "
           "taken by another config",
    })
    add_config_arguments(parser, "YAML file (see configs/); defaults: small Stage C on the Twemoji cache", "steps=500")
    args = parser.parse_args(argv)

    def train() -> None:
        cfg = load(TrainConfig, args.config, args.overrides)
        result, run_id = run_training(cfg)
        print(f"trained {cfg.checkpoint.run_name}: {result.metrics}")
        print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}; MLflow run {run_id}")

    return run_job("train", train)


if __name__ == "__main__":
    sys.exit(main())
