"""The writer of a prep run: rows in source order -> parquet files in waves of source shards, each
wave committed to the manifest once it is complete.

What it takes: Arrow tables of rows in source order, dropped ones included (`drop_reason` set; KEEP
for a kept row), each with its `source_shard`, the latent columns as raw little-endian bytes, and in
ENCODERS_COLUMN the encoders that made them (`encoder_identity`). It counts every row under its shard,
writes the kept ones as the cache's columns (`finalize`), and commits a wave once a row of a later wave
arrives or the stream ends. Before the first commit it checks the encoders the rows state against the
cache's manifest (or creates the manifest from them).

A run killed at any point leaves the manifest as it was after the last committed wave: files of an
unfinished wave are not listed, and the rerun deletes and rewrites them. So a rerun adds exactly the
rows that were missing, with no duplicates.
"""

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core import storage
from latent_cache import manifest as manifests
from latent_cache.spec import TENSOR_DTYPES, CacheSpec, decoder_text_width

KEEP = ""  # the drop_reason of a kept row
# The column in which the encoder actors state, on every row, the encoders they ran (their
# fingerprints, as JSON): the writer records them in the manifest and checks that every actor ran the same ones.
ENCODERS_COLUMN = "encoders"
# The columns whose repeated values a parquet dictionary shrinks (the others are numbers and tensors).
DICTIONARY_COLUMNS = ("key", "caption", "source_shard", "metadata", "bucket")


def binary_buffers(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) of a binary or large_binary Arrow column, as numpy views of its buffers: row i
    is data[offsets[i]:offsets[i + 1]]."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offset_type = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, offset_type)[array.offset : array.offset + len(array) + 1]
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)


def tensor_column(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...], dtype) -> pa.FixedShapeTensorArray:
    """A binary column of raw little-endian tensors, one per row -> a canonical fixed-shape tensor column."""
    offsets, data = binary_buffers(column)
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if (np.diff(offsets) != size).any():
        raise ValueError(f"every row must hold one {np.dtype(dtype)} tensor of shape {tuple(shape)} ({size} bytes)")
    flat = np.frombuffer(data, dtype, count=(len(offsets) - 1) * size // np.dtype(dtype).itemsize, offset=int(offsets[0]))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(flat.reshape(len(offsets) - 1, *shape))


def finalize(batch: pa.Table, shapes: dict[str, dict[str, list[int]]]) -> dict[str, pa.Table]:
    """Keeps the kept rows, as the cache's columns, by bucket (`shapes`: bucket -> its tensor shapes;
    with more than one, each row's `bucket` column says which): the latent bytes become fixed-shape
    tensor columns of the bucket's shapes. Buckets without a kept row are left out."""
    kept = batch.filter(pc.equal(batch.column("drop_reason"), KEEP))
    out = {}
    for bucket, bucket_shapes in shapes.items():
        rows = kept if len(shapes) == 1 else kept.filter(pc.equal(kept.column("bucket"), bucket))
        if not rows.num_rows:
            continue
        columns = {
            "key": rows.column("key").cast(pa.string()),
            "caption": rows.column("caption").cast(pa.string()),
            "source_shard": rows.column("source_shard").cast(pa.string()),
            "width": rows.column("width").cast(pa.int32()),
            "height": rows.column("height").cast(pa.int32()),
            "metadata": rows.column("metadata").cast(pa.string()),
            "content_hash": rows.column("content_hash").cast(pa.string()),
            "phash": rows.column("phash").cast(pa.uint64()),
            "clip_score": rows.column("clip_score").cast(pa.float32()),
            "bucket": pa.array([bucket] * rows.num_rows, pa.string()),
        }
        for name, shape in bucket_shapes.items():
            columns[name] = tensor_column(rows.column(name), tuple(shape), TENSOR_DTYPES[name])
        out[bucket] = pa.table(columns)
    return out


def encoder_identity(fingerprints: dict, text_width: int) -> str:
    """What an encoder actor states in ENCODERS_COLUMN: its encoders' fingerprints and the text width."""
    return json.dumps({"encoders": fingerprints, "text_width": text_width}, sort_keys=True)


def stated_encoders(rows: pa.Table) -> set[str]:
    """The distinct encoder identities stated in a batch of rows."""
    return set(pc.unique(rows.column(ENCODERS_COLUMN)).cast(pa.string()).to_pylist())  # unique first: no per-row strings


def stream_encoders(rows: pa.Table) -> tuple[str, tuple[dict, int]]:
    """(the identity the rows state, (fingerprint of each encoder, text width)); one identity only."""
    stated = stated_encoders(rows)
    if len(stated) != 1:
        raise RuntimeError(f"the encoder actors of this run state different encoders: {sorted(stated)}")
    identity = stated.pop()
    parsed = json.loads(identity)
    return identity, (parsed["encoders"], parsed["text_width"])


def _wave_id(shards: list[str]) -> str:
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]


class _Wave:
    """One wave on its way to a commit: per-shard counts of every row, and the kept rows written
    into `data/wave-<id>/` as they arrive, in files of `max_rows_per_file` rows (one row group each),
    each file of one bucket. Until the manifest lists them, these files are not part of the cache."""

    def __init__(self, fs, root: str, shards: list[str], max_rows_per_file: int):
        self.fs, self.root, self.max_rows = fs, root, max_rows_per_file
        self.dir = storage.join(root, "data", f"wave-{_wave_id(shards)}")
        if fs.get_file_info(self.dir).type == pafs.FileType.Directory:
            fs.delete_dir(self.dir)  # leftovers of a run killed before it committed this wave
        self.counts = {url: Counter() for url in shards}  # drop reason (KEEP too) -> rows
        self.bucket_counts = {url: Counter() for url in shards}  # bucket -> kept rows (a cache of several buckets)
        self.unwritten: dict[str, list[pa.Table]] = {}  # bucket -> kept rows not in a file yet
        self.files: list[dict] = []
        self.bucketed, self.bucket_names = False, []

    def add(self, rows: pa.Table, shapes: dict[str, dict]) -> None:
        self.bucketed, self.bucket_names = len(shapes) > 1, list(shapes)
        keys = ["source_shard", "drop_reason"] + ["bucket"] * self.bucketed  # a kept row's bucket too
        counted = rows.group_by(keys).aggregate([("key", "count")])
        for url, reason, *bucket, n in zip(*(counted.column(name).to_pylist() for name in [*keys, "key_count"])):
            self.counts[url][reason] += n
            if bucket and reason == KEEP:
                self.bucket_counts[url][bucket[0]] += n
        if pc.any(pc.equal(rows.column("drop_reason"), KEEP)).as_py():
            for bucket, table in finalize(rows, shapes).items():
                self.unwritten.setdefault(bucket, []).append(table)
                while sum(t.num_rows for t in self.unwritten[bucket]) >= self.max_rows:
                    self._write_file(bucket)

    def _write_file(self, bucket: str) -> None:
        table = pa.concat_tables(self.unwritten[bucket])
        part, rest = table.slice(0, self.max_rows), table.slice(self.max_rows)
        self.unwritten[bucket] = [rest] if rest.num_rows else []
        if not self.files:
            self.fs.create_dir(self.dir, recursive=True)
        path = storage.join(self.dir, f"part-{len(self.files):05d}.parquet")
        with self.fs.open_output_stream(path) as f:
            # Dictionary pages only for the text columns: on latents (distinct fp16 values) a
            # dictionary plus indices is larger than the raw tensor bytes. No min/max statistics
            # for the tensor columns: nothing reads them, and they cost 40% of the write.
            pq.write_table(
                part, f, row_group_size=self.max_rows, use_dictionary=list(DICTIONARY_COLUMNS),
                write_statistics=[c for c in part.column_names if c not in TENSOR_DTYPES],
            )
            size = f.tell()
        entry = {"path": path[len(self.root) + 1 :], "rows": part.num_rows, "bytes": size}
        self.files.append({**entry, "bucket": bucket} if self.bucketed else entry)

    def commit(self, manifest: dict) -> dict[str, dict]:
        """Writes the last file, then the manifest that lists the wave: the commit point."""
        for bucket in list(self.unwritten):  # in the order the buckets first came
            while self.unwritten[bucket]:
                self._write_file(bucket)
        wave = self.dir.rsplit("/", 1)[-1]
        shard_stats = {}
        for url, counts in self.counts.items():
            dropped = {reason: n for reason, n in counts.items() if reason != KEEP}
            shard_stats[url] = {"rows_in": sum(counts.values()), "rows_written": counts[KEEP], "dropped": dropped, "wave": wave}
            if self.bucketed:  # what a mix of shards (data.shards) trains on, bucket by bucket
                shard_stats[url]["buckets"] = {b: self.bucket_counts[url][b] for b in self.bucket_names if self.bucket_counts[url][b]}
        written = sum(s["rows_written"] for s in shard_stats.values())
        if sum(f["rows"] for f in self.files) != written:
            raise RuntimeError(f"wave {self.dir} wrote {sum(f['rows'] for f in self.files)} rows, expected {written}")
        manifests.record_wave(manifest, shard_stats, self.files)
        manifests.write(self.fs, self.root, manifest)
        return shard_stats


class CacheWriter:
    """Follows the stream of rows of `shards` (in source order, dropped ones included) and commits
    each wave of `shards_per_wave` of them once it is complete: when a row of a later wave arrives,
    or at `finish`. A shard with no rows at all is recorded too, with its wave.

    `manifest` is the cache's (its settings already checked against `spec`), or None for a new cache.
    The encoders are checked, or the manifest created, once they are known: from the first rows (what
    the encoder actors state), or at `finish` when no row came (then built here, from the spec).
    `counts` holds the run's totals so far (rows in / written, dropped by reason, waves committed);
    `on_wave(counts)` is called after each commit."""

    def __init__(self, url: str, spec: CacheSpec, manifest: dict | None, shards: list[str], *,
                 max_rows_per_file: int, shards_per_wave: int, provenance: dict, on_wave=None):
        self.url, self.spec, self.manifest, self.provenance, self.on_wave = url, spec, manifest, provenance, on_wave
        self.fs, self.root = storage.resolve(url)
        self.max_rows, self.per_wave = max_rows_per_file, shards_per_wave
        self.waves = [shards[i : i + shards_per_wave] for i in range(0, len(shards), shards_per_wave)]
        self.urls = pa.array(shards, pa.string())
        self.counts = {"rows_in": 0, "rows_written": 0, "dropped": Counter(), "waves": 0}
        self.identity = None  # the encoders every row must state, once the first rows came
        self.shapes = None  # bucket -> the tensor shapes, once the encoders are known
        self.number = 0  # the wave rows are arriving for
        self.current = None

    def _check_encoders(self, encoders: dict, text_width: int) -> None:
        """The one check of the encoders against the cache (nothing is committed before it)."""
        if self.manifest is None:
            self.manifest = manifests.new_manifest(self.spec, encoders, text_width, self.provenance)
        else:
            manifests.check_encoders(self.manifest, self.spec, encoders, text_width, self.url)
        self.shapes = self.spec.bucket_shapes(text_width, decoder_text_width(encoders))
        if self.waves:
            self.current = _Wave(self.fs, self.root, self.waves[0], self.max_rows)

    def add(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        if self.identity is None:
            # The encoders are the actors' own, as they state them; none is built here.
            self.identity, (encoders, text_width) = stream_encoders(rows)
            self._check_encoders(encoders, text_width)
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
            self.current.add(rows.slice(first, end - first), self.shapes)

    def finish(self) -> dict:
        """Commits the waves not committed yet; returns the manifest (not written when no wave was)."""
        if self.shapes is None:  # no rows at all: there is still a manifest to check and commit
            from latent_cache.encoders import spec_fingerprints

            self._check_encoders(*spec_fingerprints(self.spec))
        self._complete_before(len(self.waves))
        return self.manifest

    def _complete_before(self, wave: int) -> None:
        while self.number < wave:
            for stats in self.current.commit(self.manifest).values():
                self.counts["rows_in"] += stats["rows_in"]
                self.counts["rows_written"] += stats["rows_written"]
                self.counts["dropped"].update(stats["dropped"])
            self.counts["waves"] += 1
            if self.on_wave is not None:
                self.on_wave(self.counts)
            self.number += 1
            if self.number < len(self.waves):
                self.current = _Wave(self.fs, self.root, self.waves[self.number], self.max_rows)
