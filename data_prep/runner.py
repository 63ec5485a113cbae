"""Runs data prep: lists the source shards the cache does not hold yet and processes them in waves,
each wave committed to the manifest only after its files are complete.

A run killed at any point leaves the manifest as it was after the last committed wave: files of an
unfinished wave are not listed, and the rerun deletes and rewrites them. So a rerun adds exactly the
rows that were missing, with no duplicates, and new shards added to the source later are appended.
"""

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter

from data_prep import cache as cache_io
from data_prep.config import PrepConfig
from data_prep.encoders import (
    build_semantic_compressor,
    build_stage_a,
    build_text_encoder,
    model_fingerprint,
    text_fingerprint,
)
from data_prep.filters import check_metadata_columns, funnel
from data_prep.ray_cluster import connect
from data_prep.ray_stages import (
    KEEP,
    ClipScoreFilter,
    DeduplicateStage,
    EncodeStage,
    decode_and_filter,
    finalize,
    read_shard,
)
from stages.latents import semantic_image_size

log = logging.getLogger(__name__)


def list_source_shards(cfg: PrepConfig) -> list[tuple[str, str]]:
    """(shard URL, path) of every shard of the source, sorted."""
    if cfg.source.format == "twemoji":
        from data_prep.twemoji import twemoji_shards

        return [(url, "") for url, _ in twemoji_shards(cfg.source.shard_size)]
    from data_prep.readers import list_shards

    _, shards = list_shards(cfg.source.url, cfg.source.format)
    return list(shards)


def tensor_shapes(cfg: PrepConfig, text_width: int) -> dict[str, list[int]]:
    res = cfg.encode.resolution
    sem_h, sem_w = semantic_image_size(res, res)
    shapes = {"stage_c_latents": [16, sem_h // 32, sem_w // 32]}
    if cfg.encode.stage_a is not None:
        shapes["stage_a_latents"] = [4, res // 4, res // 4]
    if cfg.encode.text_mode == "embeddings":
        shapes["text_embeddings"] = [77, text_width]
    else:
        shapes["text_tokens"] = [77]
        shapes["text_mask"] = [77]
    return shapes


def encoder_fingerprints(cfg: PrepConfig) -> tuple[dict, int]:
    """Builds each encoder once on the driver to fingerprint it (config + weights)."""
    enc = cfg.encode
    semantic = build_semantic_compressor(enc.flavor, enc.semantic)
    text = build_text_encoder(enc)
    fingerprints = {
        "semantic_compressor": model_fingerprint("semantic_compressor", semantic, enc.semantic),
        "text_encoder": text_fingerprint(text, enc.text_encoder),
    }
    if enc.stage_a is not None:
        fingerprints["stage_a"] = model_fingerprint("stage_a", build_stage_a(enc.flavor, enc.stage_a), enc.stage_a)
    return fingerprints, text.width


def _settings(cfg: PrepConfig) -> dict:
    return {
        "flavor": cfg.encode.flavor,
        "resolution": cfg.encode.resolution,
        "bucket": f"{cfg.encode.resolution}x{cfg.encode.resolution}",
        "text_mode": cfg.encode.text_mode,
        "source": {"url": cfg.source.url, "format": cfg.source.format},
        "filters": dataclasses.asdict(cfg.filters),
    }


def _check_compatible(manifest: dict, settings: dict, encoders: dict, shapes: dict, url: str) -> None:
    for key in ("flavor", "resolution", "text_mode"):
        if manifest.get(key) != settings[key]:
            raise cache_io.CacheMismatchError(
                f"the cache at {url} was made with {key}={manifest.get(key)!r}; this run has {key}={settings[key]!r}. "
                f"Use another output URL for a different {key}."
            )
    for name, info in encoders.items():
        theirs = manifest["encoders"].get(name, {}).get("fingerprint")
        if theirs != info["fingerprint"]:
            raise cache_io.CacheMismatchError(
                f"the cache at {url} was made with a {name} of fingerprint {theirs}, this run's has "
                f"{info['fingerprint']}: appending would mix latents of different encoders. Use another output URL."
            )
    if manifest["shapes"] != shapes:
        raise cache_io.CacheMismatchError(f"the cache at {url} has tensor shapes {manifest['shapes']}, this run {shapes}")


def _wave_id(shards: list[tuple[str, str]]) -> str:
    return hashlib.sha256("\n".join(url for url, _ in shards).encode()).hexdigest()[:16]


def _clear(fs, path: str) -> None:
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _written_files(fs, root: str, wave_dir: str) -> list[dict]:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    infos = fs.get_file_info(pafs.FileSelector(wave_dir, allow_not_found=True))
    files = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File and info.path.endswith(".parquet"):
            rows = pq.ParquetFile(fs.open_input_file(info.path)).metadata.num_rows
            files.append({"path": info.path[len(root) + 1 :], "rows": rows, "bytes": info.size})
    return files


def _peek_samples(cfg: PrepConfig, shard: tuple[str, str], n: int = 200) -> list[dict]:
    return read_shard({"shard_url": shard[0], "path": shard[1]}, cfg.source)[:n]


def run_prep(cfg: PrepConfig, on_wave=None) -> dict:
    """Prepares every source shard the cache does not hold yet; returns the run's summary."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    start = time.perf_counter()
    fs, root = cache_io.resolve(cfg.output.url)
    encoders, text_width = encoder_fingerprints(cfg)
    shapes = tensor_shapes(cfg, text_width)
    settings = _settings(cfg)
    text = cache_io.read_text(fs, cache_io.join(root, cache_io.MANIFEST))
    if text is None:
        manifest = cache_io.new_manifest(settings, encoders, shapes)
    else:
        manifest = json.loads(text)
        _check_compatible(manifest, settings, encoders, shapes, cfg.output.url)

    all_shards = list_source_shards(cfg)
    pending = [s for s in all_shards if s[0] not in manifest["shards"]]
    if cfg.limit_shards is not None:
        pending = pending[: cfg.limit_shards]
    summary = {"cache": cfg.output.url, "shards_total": len(all_shards), "shards_new": len(pending), "rows_in": 0,
               "rows_written": 0, "dropped": Counter(), "waves": 0}
    if not pending:
        summary.update(seconds=time.perf_counter() - start, manifest=manifest)
        return summary
    if cfg.filters.metadata:
        check_metadata_columns(_peek_samples(cfg, pending[0]), cfg.filters, pending[0][0])

    connect(cfg.ray_address, cfg.num_cpus)
    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # the same input gives the same cache, run after run
    known = cache_io.existing_hashes(cache_io.Cache(cfg.output.url)) if manifest["files"] else []
    res = cfg.encode.resolution
    use_gpu = cfg.encode.use_gpu
    for first in range(0, len(pending), cfg.output.shards_per_wave):
        wave = pending[first : first + cfg.output.shards_per_wave]
        wave_dir = cache_io.join(root, "data", f"wave-{_wave_id(wave)}")
        _clear(fs, wave_dir)  # leftovers of a run killed before it committed this wave
        ds = ray.data.from_items([{"shard_url": u, "path": p} for u, p in wave], override_num_blocks=len(wave))
        ds = ds.flat_map(read_shard, fn_kwargs={"source": cfg.source})
        ds = ds.map_batches(decode_and_filter, fn_kwargs={"filters": cfg.filters, "resolution": res}, batch_size=64)
        if cfg.filters.clip_score is not None:
            ds = ds.map_batches(
                ClipScoreFilter, fn_constructor_kwargs={"cfg": cfg.filters.clip_score, "resolution": res},
                compute=ActorPoolStrategy(size=1), batch_size=cfg.filters.clip_score.batch_size, num_cpus=1,
            )
        ds = ds.map_batches(
            DeduplicateStage, fn_constructor_kwargs={"cfg": cfg.filters.dedup, "known": known},
            compute=ActorPoolStrategy(size=1), batch_size=256, num_cpus=0.25,
        )
        ds = ds.map_batches(
            EncodeStage, fn_constructor_kwargs={"cfg": cfg.encode}, compute=ActorPoolStrategy(size=cfg.encode.num_encoders),
            batch_size=cfg.encode.batch_size, num_gpus=1 if use_gpu else 0, num_cpus=cfg.encode.cpus_per_encoder,
        )
        done = ds.materialize()
        stats = done.select_columns(["source_shard", "drop_reason", "content_hash", "phash"]).to_pandas()
        kept = stats[stats["drop_reason"] == KEEP]
        if len(kept):
            out = done.map_batches(finalize, fn_kwargs={"shapes": shapes, "bucket": settings["bucket"]}, batch_format="pyarrow", batch_size=None)
            out.write_parquet(
                wave_dir, filesystem=fs, max_rows_per_file=cfg.output.max_rows_per_file,
                # Dictionary pages only for the text columns: on latents (distinct fp16 values) a
                # dictionary plus indices is larger than the raw tensor bytes.
                use_dictionary=list(cache_io.DICTIONARY_COLUMNS), row_group_size=cfg.output.max_rows_per_file,
            )
        files = _written_files(fs, root, wave_dir)
        if sum(f["rows"] for f in files) != len(kept):
            raise RuntimeError(f"wave {wave_dir} wrote {sum(f['rows'] for f in files)} rows, expected {len(kept)}")
        shard_stats = {}
        for url, _ in wave:
            rows = stats[stats["source_shard"] == url]
            dropped = Counter(rows.loc[rows["drop_reason"] != KEEP, "drop_reason"])
            shard_stats[url] = {"rows_in": len(rows), "rows_written": int((rows["drop_reason"] == KEEP).sum()),
                                "dropped": dict(dropped), "wave": wave_dir.rsplit("/", 1)[-1]}
            summary["dropped"].update(dropped)
        cache_io.record_wave(manifest, shard_stats, files)
        cache_io.write_text_atomically(fs, cache_io.join(root, cache_io.MANIFEST), json.dumps(manifest, indent=2) + "\n")
        known += list(zip(kept["content_hash"], (int(p) for p in kept["phash"])))
        summary["rows_in"] += len(stats)
        summary["rows_written"] += len(kept)
        summary["waves"] += 1
        if on_wave is not None:
            on_wave(summary)
    summary.update(seconds=time.perf_counter() - start, manifest=manifest)
    return summary


def format_summary(summary: dict) -> str:
    seconds = max(summary.get("seconds", 0.0), 1e-9)
    lines = [
        f"cache            {summary['cache']}",
        f"source shards    {summary['shards_new']} new of {summary['shards_total']}",
        f"rows in / out    {summary['rows_in']} / {summary['rows_written']}",
        f"throughput       {summary['rows_in'] / seconds:.1f} images/s over {seconds:.1f} s",
    ]
    if summary["dropped"]:
        lines.append("dropped          reason                  seen    dropped")
        for row in funnel(summary["dropped"], summary["rows_in"]):
            lines.append(f"                 {row['reason']:<22} {row['seen']:>6} {row['dropped']:>10}")
    manifest = summary.get("manifest")
    if manifest:
        lines.append(f"cache holds      {manifest['rows_written']} rows from {len(manifest['shards'])} shards")
    return "\n".join(lines)

