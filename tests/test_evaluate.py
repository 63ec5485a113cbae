"""The gate's evaluation data: only the held-out rows of a cache are read (the split needs only the
key column), so a cache of ~200 KB rows (v2 text embeddings) is never held in memory whole."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latent_cache.manifest import SCHEMA_VERSION
from latent_cache.reader import Cache, is_validation
from latent_cache.spec import TENSOR_DTYPES
from pipelines.evaluate import validation_batches

FRACTION = 0.2


def unreadable_except_held_out(cache, fraction: float) -> int:
    """Rewrites a cache's files with one row per row group and overwrites the tensor pages of every
    row that is not held out at `fraction`; returns how many rows are held out."""
    held = 0
    for entry in json.loads((cache / "manifest.json").read_text())["files"]:
        path = cache / entry["path"]
        pq.write_table(pq.read_table(path), path, row_group_size=1, use_dictionary=False)
        metadata = pq.ParquetFile(path).metadata
        names = metadata.schema.to_arrow_schema().names
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        with open(path, "r+b") as f:
            for group, key in enumerate(keys):
                if is_validation(key, fraction):
                    held += 1
                    continue
                for name in set(TENSOR_DTYPES) & set(names):
                    chunk = metadata.row_group(group).column(names.index(name))
                    f.seek(chunk.data_page_offset)
                    f.write(b"\xff" * chunk.total_compressed_size)
        with pytest.raises(OSError, match="thrift"):
            pq.read_table(path)  # the file as a whole cannot be read any more
    return held


def _cache(root, files: int = 2, rows: int = 30):
    """A committed cache of random latents and text embeddings, as data prep writes it."""
    rng = np.random.default_rng(0)

    def tensors(*shape):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(rng.standard_normal((rows, *shape)).astype(np.float16))

    entries = []
    for i in range(files):
        table = pa.table({
            "key": [f"f{i}/row{j}" for j in range(rows)],
            "caption": ["a caption"] * rows,
            "stage_c_latents": tensors(16, 2, 2),
            "text_embeddings": tensors(77, 8),
        })
        path = root / "data" / f"part-{i}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        entries.append({"path": f"data/part-{i}.parquet", "rows": rows})
    manifest = {"schema_version": SCHEMA_VERSION, "text_mode": "embeddings", "files": entries, "encoders": {},
                "rows_written": files * rows}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_only_the_held_out_rows_are_read(tmp_path):
    intact, _ = validation_batches(Cache(str(_cache(tmp_path / "intact"))), FRACTION, 4)
    cache = _cache(tmp_path / "damaged")
    held = unreadable_except_held_out(cache, FRACTION)
    batches, rows = validation_batches(Cache(str(cache)), FRACTION, 4)
    assert 0 < rows == held < 60
    assert [len(b["key"]) for b in batches] == [len(b["key"]) for b in intact]
    for ours, theirs in zip(batches, intact):
        assert list(ours["key"]) == list(theirs["key"]) and all(is_validation(k, FRACTION) for k in ours["key"])
        for name in ("stage_c_latents", "text_embeddings"):
            assert ours[name].shape[1:] == theirs[name].shape[1:] and np.array_equal(ours[name], theirs[name])


def test_a_cache_without_held_out_rows_gives_none(tmp_path):
    assert validation_batches(Cache(str(_cache(tmp_path, rows=3))), 0.0, 4) == ([], 0)


def test_the_spec_id_covers_what_changes_the_figures_and_how_retrieval_samples(tmp_path, monkeypatch):
    """Figures recorded under a spec id are reused by the gate: a spec that would give other figures
    (a setting, the cache, a new way of sampling retrieval's latents) gets another id; the batch
    size, which changes nothing, does not."""
    from pipelines import quality
    from pipelines.evaluate import EvalSpec

    manifest = {**json.loads((_cache(tmp_path).joinpath("manifest.json")).read_text()), "shapes": {}}
    spec = EvalSpec(cache=str(tmp_path))
    first = spec.spec_id(manifest)
    assert EvalSpec(cache=str(tmp_path), batch_size=8).spec_id(manifest) == first
    assert EvalSpec(cache=str(tmp_path), retrieval_steps=20).spec_id(manifest) != first
    grown = {**manifest, "files": manifest["files"] + [{"path": "data/part-2.parquet", "rows": 30}]}
    assert spec.spec_id(grown) != first
    monkeypatch.setattr(quality, "RETRIEVAL_SAMPLING", quality.RETRIEVAL_SAMPLING + 1)
    assert spec.spec_id(manifest) != first
