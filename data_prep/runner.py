"""Runs data prep: lists the source shards the cache does not hold yet and streams them all through
one Ray Data execution (the actors start once per run), in source order. The driver commits them in
waves of `output.shards_per_wave` shards: each wave's files are written as its rows arrive, and the
wave is committed to the manifest once a row of a later wave arrives or the stream ends.

A run killed at any point leaves the manifest as it was after the last committed wave: files of an
unfinished wave are not listed, and the rerun deletes and rewrites them. So a rerun adds exactly the
rows that were missing, with no duplicates, and new shards added to the source later are appended.
"""

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections import Counter

from core import storage
from latent_cache import cache as cache_io
from data_prep.config import OutputConfig, PrepConfig
from data_prep.filters import check_metadata_columns, funnel
from core.ray_cluster import connect
from data_prep.ray_stages import (
    KEEP,
    ClipScoreFilter,
    DeduplicateStage,
    EncodeStage,
    decode_and_filter,
    finalize,
    read_shard,
    stated_encoders,
)
from stages.latents import semantic_image_size

log = logging.getLogger(__name__)

DECODE_BATCH = 64  # samples per decode task, and rows per block from there to the encoders
# Blocks a CPU encoder actor runs at a time: their jobs share its one thread pool, so no job thread
# waits at the end of a block while the next one is fetched, unpacked and packed.
CPU_ENCODER_CALLS = 2


def list_source_shards(cfg: PrepConfig) -> list[tuple[str, str]]:
    """(shard URL, path) of every shard of the source, sorted."""
    return source_shards(cfg)[1]


def source_shards(cfg: PrepConfig):
    """(the source's filesystem, None for Twemoji; (shard URL, path) of every shard, sorted). The read
    tasks get this filesystem: it carries the region the listing found for an S3 bucket."""
    if cfg.source.format == "twemoji":
        from data_prep.twemoji import twemoji_shards

        return None, [(url, "") for url, _ in twemoji_shards(cfg.source.shard_size)]
    from data_prep.readers import list_shards

    fs, shards = list_shards(cfg.source.url, cfg.source.format)
    return fs, list(shards)


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
    """(fingerprint of each encoder, text width), the encoders built here, on the driver. A run with
    rows gets them from its encoder actors instead (see `_stream_encoders`); this is for a run with
    nothing to encode, which still checks the cache against its config."""
    from latent_cache import encoders

    enc = cfg.encode
    semantic = encoders.build_semantic_compressor(enc.flavor, enc.semantic)
    text = encoders.build_text_encoder(enc.flavor, enc.text_encoder, enc.text_width)
    stage_a = encoders.build_stage_a(enc.flavor, enc.stage_a) if enc.stage_a is not None else None
    return encoders.encoder_fingerprints(enc, semantic, text, stage_a), text.width


def _stream_encoders(rows) -> tuple[str, tuple[dict, int]]:
    """(the identity the encoder actors state in their output, (fingerprint of each encoder, text width))."""
    stated = stated_encoders(rows)
    if len(stated) != 1:
        raise RuntimeError(f"the encoder actors of this run state different encoders: {sorted(stated)}")
    identity = stated.pop()
    parsed = json.loads(identity)
    return identity, (parsed["encoders"], parsed["text_width"])


def _settings(cfg: PrepConfig) -> dict:
    return {
        "flavor": cfg.encode.flavor,
        "resolution": cfg.encode.resolution,
        "bucket": f"{cfg.encode.resolution}x{cfg.encode.resolution}",
        "text_mode": cfg.encode.text_mode,
        "source": {"url": cfg.source.url, "format": cfg.source.format},
        "filters": dataclasses.asdict(cfg.filters),
    }


def _check_settings(manifest: dict, settings: dict, url: str) -> None:
    for key in ("flavor", "resolution", "text_mode"):
        if manifest.get(key) != settings[key]:
            raise cache_io.CacheMismatchError(
                f"the cache at {url} was made with {key}={manifest.get(key)!r}; this run has {key}={settings[key]!r}. "
                f"Use another output URL for a different {key}."
            )


def _check_encoders(manifest: dict, encoders: dict, shapes: dict, url: str) -> None:
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


def _peek_samples(cfg: PrepConfig, source_fs, shard: tuple[str, str], n: int = 200) -> list[dict]:
    return list(itertools.islice(read_shard({"shard_url": shard[0], "path": shard[1]}, cfg.source, source_fs), n))


class _Wave:
    """One wave on its way to a commit: per-shard counts of every row, and the kept rows written
    into `data/wave-<id>/` as they arrive, in files of `max_rows_per_file` rows (one row group each).
    Until the manifest lists them, these files are not part of the cache."""

    def __init__(self, fs, root: str, shards: list[tuple[str, str]], max_rows_per_file: int):
        self.fs, self.root, self.max_rows = fs, root, max_rows_per_file
        self.dir = storage.join(root, "data", f"wave-{_wave_id(shards)}")
        _clear(fs, self.dir)  # leftovers of a run killed before it committed this wave
        self.counts = {url: Counter() for url, _ in shards}  # drop reason (KEEP too) -> rows
        self.unwritten: list = []  # kept rows not in a file yet (pyarrow tables)
        self.files: list[dict] = []

    def add(self, rows, shapes: dict, bucket: str) -> None:
        import pyarrow.compute as pc

        counted = rows.group_by(["source_shard", "drop_reason"]).aggregate([("key", "count")])
        columns = (counted.column(name).to_pylist() for name in ("source_shard", "drop_reason", "key_count"))
        for url, reason, n in zip(*columns):
            self.counts[url][reason] += n
        if pc.any(pc.equal(rows.column("drop_reason"), KEEP)).as_py():
            self.unwritten.append(finalize(rows, shapes, bucket))
        while sum(t.num_rows for t in self.unwritten) >= self.max_rows:
            self._write_file()

    def _write_file(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables(self.unwritten)
        part, rest = table.slice(0, self.max_rows), table.slice(self.max_rows)
        self.unwritten = [rest] if rest.num_rows else []
        if not self.files:
            self.fs.create_dir(self.dir, recursive=True)
        path = storage.join(self.dir, f"part-{len(self.files):05d}.parquet")
        with self.fs.open_output_stream(path) as f:
            # Dictionary pages only for the text columns: on latents (distinct fp16 values) a
            # dictionary plus indices is larger than the raw tensor bytes. No min/max statistics
            # for the tensor columns: nothing reads them, and they cost 40% of the write.
            pq.write_table(
                part, f, row_group_size=self.max_rows, use_dictionary=list(cache_io.DICTIONARY_COLUMNS),
                write_statistics=[c for c in part.column_names if c not in cache_io.TENSOR_DTYPES],
            )
            size = f.tell()
        self.files.append({"path": path[len(self.root) + 1 :], "rows": part.num_rows, "bytes": size})

    def commit(self, manifest: dict, manifest_path: str) -> dict[str, dict]:
        """Writes the last file, then the manifest that lists the wave: the commit point."""
        while self.unwritten:
            self._write_file()
        wave = self.dir.rsplit("/", 1)[-1]
        shard_stats = {}
        for url, counts in self.counts.items():
            dropped = {reason: n for reason, n in counts.items() if reason != KEEP}
            shard_stats[url] = {"rows_in": sum(counts.values()), "rows_written": counts[KEEP], "dropped": dropped, "wave": wave}
        written = sum(s["rows_written"] for s in shard_stats.values())
        if sum(f["rows"] for f in self.files) != written:
            raise RuntimeError(f"wave {self.dir} wrote {sum(f['rows'] for f in self.files)} rows, expected {written}")
        cache_io.record_wave(manifest, shard_stats, self.files)
        storage.write_text_atomically(self.fs, manifest_path, json.dumps(manifest, indent=2) + "\n")
        return shard_stats


class _Waves:
    """Follows the stream of rows (in source order, dropped ones included) and commits each wave
    once it is complete: when a row of a later wave arrives, or the stream ends. A shard with no
    rows at all is recorded too, with its wave."""

    def __init__(self, fs, root: str, manifest: dict, pending: list[tuple[str, str]], output: OutputConfig,
                 shapes: dict, summary: dict, on_wave, identity: str | None = None):
        import pyarrow as pa

        self.fs, self.root, self.manifest, self.shapes, self.summary, self.on_wave = fs, root, manifest, shapes, summary, on_wave
        self.identity = identity  # the encoders every row must state (None: rows state none)
        self.manifest_path = storage.join(root, cache_io.MANIFEST)
        self.bucket = manifest["bucket"]
        self.max_rows, self.per_wave = output.max_rows_per_file, output.shards_per_wave
        self.waves = [pending[i : i + self.per_wave] for i in range(0, len(pending), self.per_wave)]
        self.urls = pa.array([url for url, _ in pending], pa.string())
        self.number = 0  # the wave rows are arriving for
        self.current = _Wave(fs, root, self.waves[0], self.max_rows)

    def add(self, rows) -> None:
        import numpy as np
        import pyarrow.compute as pc

        if not rows.num_rows:
            return
        if self.identity is not None:
            stated = stated_encoders(rows)
            if stated != {self.identity}:
                raise RuntimeError(
                    f"an encoder actor of this run states other encoders than the first one did (a node with "
                    f"other weights?): {sorted(stated - {self.identity})} instead of {self.identity}"
                )
        shard = pc.index_in(rows.column("source_shard").cast(self.urls.type), value_set=self.urls)
        if shard.null_count:
            raise RuntimeError(f"data prep got rows of shards it was not given: {pc.unique(rows.column('source_shard'))}")
        wave = shard.to_numpy(zero_copy_only=False).astype(np.int64) // self.per_wave
        if wave[0] < self.number or (np.diff(wave) < 0).any():
            raise RuntimeError("data prep rows arrived out of source order: waves cannot be committed safely")
        for w in np.unique(wave):
            self._complete_before(int(w))
            first, end = np.searchsorted(wave, [w, w + 1])
            self.current.add(rows.slice(first, end - first), self.shapes, self.bucket)

    def finish(self) -> None:
        self._complete_before(len(self.waves))

    def _complete_before(self, wave: int) -> None:
        while self.number < wave:
            shard_stats = self.current.commit(self.manifest, self.manifest_path)
            for stats in shard_stats.values():
                self.summary["rows_in"] += stats["rows_in"]
                self.summary["rows_written"] += stats["rows_written"]
                self.summary["dropped"].update(stats["dropped"])
            self.summary["waves"] += 1
            if self.on_wave is not None:
                self.on_wave(self.summary)
            self.number += 1
            if self.number < len(self.waves):
                self.current = _Wave(self.fs, self.root, self.waves[self.number], self.max_rows)


def _prep_dataset(cfg: PrepConfig, source_fs, pending: list[tuple[str, str]], known: list):
    """read -> decode + filter -> (CLIP score) -> deduplicate -> encode, over every pending shard in
    one streaming execution: the actors start once per run. The read tasks get `source_fs`, the
    filesystem of the listing (pickled with its S3 region)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    res = cfg.encode.resolution
    ds = ray.data.from_items([{"shard_url": u, "path": p} for u, p in pending], override_num_blocks=len(pending))
    ds = ds.flat_map(read_shard, fn_kwargs={"source": cfg.source, "fs": source_fs})
    full_pixels = cfg.encode.stage_a is not None or cfg.filters.clip_score is not None
    sizes = {"resolution": res if full_pixels else None, "semantic_size": semantic_image_size(res, res)}
    ds = ds.map_batches(decode_and_filter, fn_kwargs={"filters": cfg.filters, **sizes}, batch_size=DECODE_BATCH)
    if cfg.filters.clip_score is not None:
        ds = ds.map_batches(
            ClipScoreFilter, fn_constructor_kwargs={"cfg": cfg.filters.clip_score, "resolution": res},
            compute=ActorPoolStrategy(size=1), batch_size=cfg.filters.clip_score.batch_size, num_cpus=1,
        )
    # Blocks of DECODE_BATCH rows from here on: the encoder actors get work in units of a second or
    # two, so that at the end of the stream none waits long for another to finish a large block.
    ds = ds.map_batches(
        DeduplicateStage, fn_constructor_kwargs={"cfg": cfg.filters.dedup, "known": known},
        compute=ActorPoolStrategy(size=1), batch_size=DECODE_BATCH, num_cpus=0.25, batch_format="pyarrow",
    )
    concurrent = {}
    if not cfg.encode.use_gpu:
        concurrent = {"max_concurrent_calls_per_actor": CPU_ENCODER_CALLS, "enable_true_multi_threading": True}
    return ds.map_batches(
        EncodeStage, fn_constructor_kwargs={"cfg": cfg.encode},
        compute=ActorPoolStrategy(size=cfg.encode.num_encoders, **concurrent),
        batch_size=cfg.encode.batch_size, num_gpus=1 if cfg.encode.use_gpu else 0, num_cpus=cfg.encode.cpus_per_encoder,
        batch_format="pyarrow",
    )


def _checked_manifest(manifest: dict | None, settings: dict, fingerprints: dict, cfg: PrepConfig) -> tuple[dict, dict]:
    """(the manifest to commit waves to, the tensor shapes): a new one, or the cache's own once its
    encoders and shapes are found to be this run's."""
    encoders, text_width = fingerprints
    shapes = tensor_shapes(cfg, text_width)
    if manifest is None:
        return cache_io.new_manifest(settings, encoders, shapes), shapes
    _check_encoders(manifest, encoders, shapes, cfg.output.url)
    return manifest, shapes


@contextlib.contextmanager
def _storage_errors_unwrapped():
    """A StorageError raised in a Ray task (a read task refused by S3) reaches the driver inside
    Ray's wrappers (RayTaskError, UserCodeException), whose text is a remote traceback: re-raised
    as the task raised it, so that the job says one line and exits 2."""
    try:
        yield
    except Exception as err:
        found, seen = None, set()
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if isinstance(err, storage.StorageError):
                found = err  # the innermost one is the task's own, with its own message
            err = getattr(err, "cause", None) or err.__cause__
        if found is None:
            raise
        # Ray Data appends lines of retry advice to the message, and Ray may have mixed its error
        # class into the type: the job gets our own class and our one line.
        kind = next(c for c in type(found).__mro__ if c.__module__ == storage.StorageError.__module__)
        raise kind(str(found).splitlines()[0]) from None


def run_prep(cfg: PrepConfig, on_wave=None, shards: list[str] | None = None) -> dict:
    """Prepares every source shard the cache does not hold yet (with `shards`, only those of them:
    what a retraining attempt recorded); returns the run's summary.

    One streaming execution runs over all pending shards, in source order; the driver counts each
    arriving row under its shard, writes the kept ones into their wave's files, and commits a wave
    as soon as a row of a later wave arrives (or the stream ends)."""
    from ray.data import DataContext

    start = time.perf_counter()
    fs, root = storage.resolve(cfg.output.url)
    settings = _settings(cfg)
    text = storage.read_text(fs, storage.join(root, cache_io.MANIFEST))
    manifest = json.loads(text) if text is not None else None
    if manifest is not None:
        _check_settings(manifest, settings, cfg.output.url)
    source_fs, all_shards = source_shards(cfg)
    pending = [s for s in all_shards if manifest is None or s[0] not in manifest["shards"]]
    if shards is not None:
        gone = sorted(set(shards) - {url for url, _ in all_shards} - set(manifest["shards"] if manifest else ()))
        if gone:
            raise FileNotFoundError(
                f"source shards to prepare are neither in {cfg.source.url} nor in the cache {cfg.output.url}: "
                f"{gone[:3]}; put them back, or drop the attempt that lists them"
            )
        wanted = set(shards)
        pending = [s for s in pending if s[0] in wanted]
    if cfg.limit_shards is not None:
        pending = pending[: cfg.limit_shards]
    summary = {"cache": cfg.output.url, "shards_total": len(all_shards), "shards_new": len(pending), "rows_in": 0,
               "rows_written": 0, "dropped": Counter(), "waves": 0}
    if not pending:
        manifest, _ = _checked_manifest(manifest, settings, encoder_fingerprints(cfg), cfg)
        summary.update(seconds=time.perf_counter() - start, manifest=manifest)
        return summary
    if cfg.filters.metadata:
        check_metadata_columns(_peek_samples(cfg, source_fs, pending[0]), cfg.filters, pending[0][0])

    connect(cfg.ray_address, cfg.num_cpus)
    DataContext.get_current().execution_options.preserve_order = True  # the same input gives the same cache, run after run
    known = cache_io.existing_hashes(cache_io.Cache(cfg.output.url)) if manifest and manifest["files"] else []
    batches = iter(_prep_dataset(cfg, source_fs, pending, known).iter_batches(batch_format="pyarrow", batch_size=None))
    with contextlib.closing(batches), _storage_errors_unwrapped():  # on any failure, the execution stops at once
        first = next((rows for rows in batches if rows.num_rows), None)  # waits while the actors start
        if first is not None:
            # The encoders are the actors' own, as they state them; none is built here. Nothing is
            # committed before they are checked against the cache's.
            identity, fingerprints = _stream_encoders(first)
        else:  # the new shards hold no samples at all: there is still a manifest to check and commit
            fingerprints, identity = encoder_fingerprints(cfg), None
        manifest, shapes = _checked_manifest(manifest, settings, fingerprints, cfg)
        waves = _Waves(fs, root, manifest, pending, cfg.output, shapes, summary, on_wave, identity)
        for rows in itertools.chain([first] if first is not None else [], batches):
            waves.add(rows)
        waves.finish()
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

