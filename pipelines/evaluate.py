"""`python -m pipelines.evaluate` / `wuerstchen evaluate`: the deterministic figures of a registered
Stage C version, written to the version's tags.

    wuerstchen evaluate --model models:/wuerstchen-stage-c/3 [--cache URL] [--tracking-uri URI]

- val_loss: the training's validation loss, the p2-weighted noise MSE on every held-out row of the
  cache (chosen by a hash of its key, never trained on) at each t of a fixed grid, with noise fixed
  per (key, t);
- condition_gap: the same loss with each held-out row given the next row's caption, minus val_loss
  (about 0 for a prior that ignores its text, which the loss alone does not show);
- caption -> latent retrieval (`pipelines.quality.prior_retrieval`): latents sampled (seeded) for
  retrieval_captions held-out captions and train_captions training captions spread over the cache,
  each own latent ranked among those rows' latents: retrieval_* and train_retrieval_* (top1, top10,
  median_rank), and chance_median_rank.

The same spec gives the same figures for the same weights, on any machine and batch size. Only the
held-out rows (and the few training rows of the retrieval) are read into memory. Submitted to a
cluster (`ray job submit` sets RAY_ADDRESS), it runs as a Ray task, on a GPU node when the cluster
has one. The spec (cache, held-out fraction, t grid, seed, weighting, retrieval steps and guidance)
defaults to the one the version was trained with; its id, which also covers the cache's content,
keys the result:

    eval.<spec id>.<figure>   eval.<spec id>.rows   eval.latest (JSON: spec, id, result)
"""

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveInt

from pipelines import registry
from pipelines.cli import job_parser, run_job
from core.config import HeldOutFraction, NoiseLevels, config_dataclass

log = logging.getLogger(__name__)


@config_dataclass
class EvalSpec:
    cache: str
    validation_fraction: HeldOutFraction = 0.05
    t_grid: NoiseLevels = (0.1, 0.3, 0.5, 0.7, 0.9)
    seed: int = 0
    p2_weighting: bool = True
    # Caption -> latent retrieval (see the training's validation.retrieval_* and
    # pipelines.quality.prior_retrieval): latents sampled for this many held-out captions and this
    # many training captions (spread over the cache), each own cached latent ranked among all the
    # held-out latents and those training rows'. 0: not measured (the gate's default needs them).
    retrieval_captions: NonNegativeInt = 32
    train_captions: NonNegativeInt = 32
    retrieval_steps: PositiveInt = 10
    retrieval_guidance: NonNegativeFloat = 4.0
    batch_size: PositiveInt = 32  # does not change the result

    def spec_id(self, manifest: dict) -> str:
        """Covers everything that changes the number: the spec (not the batch size), the cache content
        and how retrieval samples (quality.RETRIEVAL_SAMPLING)."""
        from pipelines.quality import RETRIEVAL_SAMPLING

        body = {**dataclasses.asdict(self), "t_grid": [float(t) for t in self.t_grid], "cache": registry.cache_fingerprint(manifest),
                "retrieval_sampling": RETRIEVAL_SAMPLING}
        body.pop("batch_size")
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def default_spec(mlflow_client, version, cache: str | None = None) -> EvalSpec:
    """The spec a version was trained with (from its model config), optionally on another cache."""
    spec = EvalSpec(**registry.model_config_of(f"models:/{version.name}/{version.version}")["eval_spec"])
    if cache:
        spec.cache = cache
    return spec


def held_out_batches(cache, fraction: float, columns: list[str], batch_rows: int = 256, bucket: str | None = None):
    """The held-out rows of the cache, with `columns`, as pyarrow RecordBatches.

    The split is decided on the key column alone; the other columns are read only from the row groups
    that hold a held-out row, streamed through in batches of `batch_rows` of which only the held-out
    rows are kept. So memory holds the held-out rows (a small fraction of the cache: rows of v2 text
    embeddings are ~200 KB each) plus one row group in decoding (measured: ~2x its tensor bytes, where
    reading the whole table took ~5x the whole cache's), never the whole cache. `bucket`: of one
    aspect-ratio bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from latent_cache.reader import is_validation

    for path in cache.files_of(bucket):
        with cache.fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.metadata.num_row_groups):
                keys = parquet.read_row_group(group, columns=["key"]).column("key").to_pylist()
                held = [is_validation(k, fraction) for k in keys]
                if not any(held):
                    continue  # nothing of this row group is read beyond its keys
                start = 0
                for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                    mask = pa.array(held[start : start + batch.num_rows], pa.bool_())
                    start += batch.num_rows
                    yield batch.filter(mask)


def validation_batches(cache, fraction: float, batch_size: int, bucket: str | None = None) -> tuple[list[dict], int]:
    """The held-out rows of the cache (or of a bucket of it) with the columns of Stage C's
    validation, as numpy batches of `batch_size` rows, and how many rows they hold."""
    import numpy as np
    import pyarrow as pa

    from pipelines.training.tasks import stage_c_columns

    columns = stage_c_columns(cache.manifest["text_mode"])
    held = [b for b in held_out_batches(cache, fraction, columns, bucket=bucket) if b.num_rows]
    if not held:
        return [], 0
    table = pa.Table.from_batches(held)
    batches = []
    for start in range(0, table.num_rows, batch_size):
        part = table.slice(start, batch_size)
        batch = {"key": np.asarray(part.column("key").to_pylist(), dtype=object)}
        for name in columns[1:]:
            batch[name] = part.column(name).combine_chunks().to_numpy_ndarray()
        batches.append(batch)
    return batches, table.num_rows


def evaluate_model(model_uri: str, spec: EvalSpec | None = None, tracking_uri: str | None = None) -> dict:
    """Evaluates a registered version and records the result on it; returns the result."""
    import torch

    from latent_cache.reader import Cache
    from pipelines.pyfunc_models import TextEncoderRef
    from pipelines.quality import bucket_mean
    from pipelines.training.tasks import condition_gap, validation_inputs
    from stages.objectives import stage_c_validation_loss

    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve_version(mlflow_client, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = registry.download(f"models:/{version.name}/{version.version}", tmp)
        config = registry.model_config(folder)
        model = registry.stage_c_in(folder)
    if spec is None:
        spec = EvalSpec(**config["eval_spec"])
    cache = Cache(spec.cache)
    trained_on = {k.split(".", 1)[1]: v for k, v in version.tags.items() if k.startswith("fingerprint.")}
    cache.check_fingerprints({k: v for k, v in trained_on.items() if k in ("semantic_compressor", "text_encoder")})
    spec_id = spec.spec_id(cache.manifest)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text_encoder = None
    if cache.manifest["text_mode"] == "tokens" or spec.retrieval_captions or spec.train_captions:
        text_encoder = TextEncoderRef.from_dict(config["text_encoder"]).load().to(device)
    tokens_encoder = text_encoder if cache.manifest["text_mode"] == "tokens" else None
    model = model.to(device)
    space = registry.latent_space_of(config)

    def figures_of(bucket: str | None) -> tuple[dict, int]:
        batches, rows = validation_batches(cache, spec.validation_fraction, spec.batch_size, bucket)
        if rows == 0:
            return {}, 0
        held = list(validation_inputs(batches, device, tokens_encoder))
        found = condition_gap(lambda it: stage_c_validation_loss(model, it, spec.t_grid, spec.seed, spec.p2_weighting, space),
                              held, 2)
        if spec.retrieval_captions or spec.train_captions:
            found.update(retrieval(model, cache, held, spec, device, tokens_encoder, text_encoder, space, bucket))
        return found, rows

    if len(cache.buckets) == 1:
        figures, rows = figures_of(None)
    else:  # each aspect-ratio bucket on its own (its latents' shapes), then their mean by held-out rows
        each = {bucket: figures_of(bucket) for bucket in cache.buckets}
        each = {bucket: found for bucket, found in each.items() if found[1]}
        figures = bucket_mean({b: found for b, (found, _) in each.items()}, {b: n for b, (_, n) in each.items()})
        rows = sum(n for _, n in each.values())
    if rows == 0:
        raise ValueError(f"the cache at {spec.cache} has no held-out rows at validation_fraction={spec.validation_fraction}")
    figures["val_loss"] = figures.pop("loss")
    result = {**figures, "rows": rows, "spec_id": spec_id, "spec": dataclasses.asdict(spec)}
    for name, value in figures.items():
        mlflow_client.set_model_version_tag(version.name, version.version, f"eval.{spec_id}.{name}", f"{value:.8g}")
    mlflow_client.set_model_version_tag(version.name, version.version, f"eval.{spec_id}.rows", str(rows))
    mlflow_client.set_model_version_tag(version.name, version.version, "eval.latest", json.dumps(result))
    log.info("models:/%s/%s: val_loss %.6g on %d held-out rows (spec %s)", version.name, version.version,
             figures["val_loss"], rows, spec_id)
    return {**result, "name": version.name, "version": version.version}


def retrieval(model, cache, held: list[tuple], spec: EvalSpec, device, tokens_encoder, text_encoder,
              space: str = "v2", bucket: str | None = None) -> dict:
    """Caption -> latent retrieval (`pipelines.training.tasks.retrieval_figures`) for
    spec.retrieval_captions held-out captions and spec.train_captions training captions spread over
    the cache (or a bucket of it): retrieval_* and train_retrieval_* (top1, top10, median_rank), and
    chance_median_rank."""
    import torch

    from pipelines.training.tasks import probe_rows, retrieval_figures

    probe = probe_rows(cache, spec.train_captions, spec.validation_fraction, bucket) if spec.train_captions else None
    with torch.no_grad():
        empty = text_encoder.encode([""]).to(device).float()
    return retrieval_figures(model, held, probe, spec.retrieval_captions, empty, spec.retrieval_steps,
                             spec.retrieval_guidance, spec.seed, tokens_encoder, space)


def evaluation_resources() -> dict:
    """What the evaluation task asks Ray for: a GPU when the cluster has one. The driver of a job runs
    on the head node, which usually has none."""
    import ray

    return {"num_cpus": 1, "num_gpus": 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0}


def run_evaluation(model_uri: str, spec: EvalSpec | None = None, tracking_uri: str | None = None) -> dict:
    """`evaluate_model` as a Ray task when this process is connected to a Ray cluster (on a GPU node
    when the cluster has GPUs), else here. Its errors are raised here, as the task's cause's type."""
    import ray

    from pipelines.training.tracking import tracking_uri as resolved_uri

    uri = resolved_uri(tracking_uri)  # the worker has another working directory and environment
    if not ray.is_initialized():
        return evaluate_model(model_uri, spec, uri)
    task = ray.remote(max_retries=0, **evaluation_resources())(evaluate_model)
    return ray.get(task.remote(model_uri, spec, uri))


def recorded(version, spec_id: str) -> dict[str, float] | None:
    """The figures a version was given under a spec id (val_loss, condition_gap, retrieval_*, ...),
    or None when never evaluated under it."""
    prefix = f"eval.{spec_id}."
    figures = {k[len(prefix):]: float(v) for k, v in version.tags.items() if k.startswith(prefix) and k != f"{prefix}rows"}
    return figures if "val_loss" in figures else None


def describe(figures: dict) -> list[str]:
    """An evaluation's figures as lines a person reads, retrieval beside chance."""
    lines = [f"val_loss {figures['val_loss']:.6g}" + (f", text condition gap {figures['condition_gap']:.4g} (the loss with "
             "another row's caption minus with its own; 0 for a prior that ignores its text)" if "condition_gap" in figures else "")]
    for name, what in (("retrieval", "held-out"), ("train_retrieval", "training")):
        if f"{name}_median_rank" in figures:
            lines.append(f"{what} caption -> latent retrieval: median rank {figures[f'{name}_median_rank']:.0f} "
                         f"(chance {figures['chance_median_rank']:.0f}), top-10 {figures[f'{name}_top10']:.0%}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("evaluate", __doc__, {
        0: "evaluated",
        1: "failed",
        2: "bad arguments, or a cache the model does not fit",
    })
    parser.add_argument("--model", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--cache", help="evaluate on this cache (default: the one the version was trained on)")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else runs/mlflow.db")
    args = parser.parse_args(argv)

    def evaluate() -> None:
        if os.environ.get("RAY_ADDRESS"):  # submitted to a cluster (`ray job submit`): evaluate on its nodes
            from core.ray_cluster import connect

            connect()
        spec = None
        if args.cache:
            mlflow_client = registry.client(args.tracking_uri)
            spec = default_spec(mlflow_client, registry.resolve_version(mlflow_client, args.model), args.cache)
        result = run_evaluation(args.model, spec, args.tracking_uri)
        print(f"models:/{result['name']}/{result['version']} on {result['rows']} held-out rows of {result['spec']['cache']} "
              f"(spec {result['spec_id']}):")
        for line in describe(result):
            print(f"   {line}")

    return run_job("evaluate", evaluate)


if __name__ == "__main__":
    sys.exit(main())
