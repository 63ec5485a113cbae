"""`manifest.json`, a cache's commit point: what it was made with (spec settings, encoders'
fingerprints, tensor shapes), which source shards it holds with their counts, and which files. Only
the files it lists are part of the cache. Every check of a manifest against a spec is here."""

import json
import time

from core.storage import join, read_text, write_text_atomically
from latent_cache.spec import CacheSpec, decoder_text_width

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class CacheMismatchError(ValueError):
    """A cache made by other encoders (or settings) than the ones it is used with."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read(fs, root: str) -> dict | None:
    """The manifest of the cache at `root`, or None when there is none yet."""
    text = read_text(fs, join(root, MANIFEST))
    return json.loads(text) if text is not None else None


def write(fs, root: str, manifest: dict) -> None:
    """Replaces the manifest at once: the commit."""
    write_text_atomically(fs, join(root, MANIFEST), json.dumps(manifest, indent=2) + "\n")


def new_manifest(spec: CacheSpec, encoders: dict, text_width: int, provenance: dict) -> dict:
    """An empty cache's manifest. `provenance`: what else the writer records (prep's source and filters)."""
    now = _now()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_at": now,
        "updated_at": now,
        **spec.settings(),
        **provenance,
        "shapes": spec.tensor_shapes(text_width, decoder_text_width(encoders)),
        "encoders": encoders,
        "shards": {},
        "files": [],
        "rows_in": 0,
        "rows_written": 0,
        "dropped": {},
    }
    if spec.bucketed:  # each bucket's tensor shapes and rows (a square-only cache: "shapes" and "rows_written")
        widths = (text_width, decoder_text_width(encoders))
        manifest["buckets"] = {b: {"shapes": shapes, "rows": 0} for b, shapes in spec.bucket_shapes(*widths).items()}
    return manifest


def buckets(manifest: dict) -> dict[str, dict]:
    """bucket -> {"shapes", "rows"} of a cache; a square-only cache's one bucket."""
    if "buckets" in manifest:
        return manifest["buckets"]
    return {manifest["bucket"]: {"shapes": manifest["shapes"], "rows": manifest["rows_written"]}}


def record_wave(manifest: dict, shard_stats: dict[str, dict], files: list[dict]) -> dict:
    """Adds a committed wave: its shards' counts and its files."""
    for shard, stats in shard_stats.items():
        manifest["shards"][shard] = stats
        manifest["rows_in"] += stats["rows_in"]
        manifest["rows_written"] += stats["rows_written"]
        for reason, count in stats["dropped"].items():
            manifest["dropped"][reason] = manifest["dropped"].get(reason, 0) + count
    manifest["files"].extend(files)
    if "buckets" in manifest:
        for f in files:
            manifest["buckets"][f["bucket"]]["rows"] += f["rows"]
    manifest["updated_at"] = _now()
    return manifest


def check_settings(manifest: dict, spec: CacheSpec, url: str) -> None:
    """Refuses to append to a cache of another flavor, resolution or text mode."""
    settings = spec.settings()
    for key in ("flavor", "resolution", "text_mode"):
        if manifest.get(key) != settings[key]:
            raise CacheMismatchError(
                f"the cache at {url} was made with {key}={manifest.get(key)!r}; this run has {key}={settings[key]!r}. "
                f"Use another output URL for a different {key}."
            )
    if list(buckets(manifest)) != spec.bucket_names:
        raise CacheMismatchError(f"the cache at {url} holds the buckets {list(buckets(manifest))}; this run cuts images "
                                 f"to {spec.bucket_names}. Use another output URL for other buckets.")


def check_encoders(manifest: dict, spec: CacheSpec, encoders: dict, text_width: int, url: str) -> None:
    """Refuses to append latents of other encoders (their fingerprints), or of other tensor shapes."""
    for name, info in encoders.items():
        theirs = manifest["encoders"].get(name, {}).get("fingerprint")
        if theirs != info["fingerprint"]:
            raise CacheMismatchError(
                f"the cache at {url} was made with a {name} of fingerprint {theirs}, this run's has "
                f"{info['fingerprint']}: appending would mix latents of different encoders. Use another output URL."
            )
    held = buckets(manifest)  # a square-only cache: its one bucket, the manifest's own shapes
    for bucket, shapes in spec.bucket_shapes(text_width, decoder_text_width(encoders)).items():
        theirs = held.get(bucket, {}).get("shapes")
        if theirs != shapes:
            raise CacheMismatchError(f"the cache at {url} has tensor shapes {theirs} in bucket {bucket}, this run {shapes}")


# encoder -> (the column its output fills, the prep setting that adds it) for the optional ones
ENCODER_OUTPUTS = {
    "stage_a": ("stage_a_latents column (Stage A latents)", "stage_a"),
    "decoder_text_encoder": ("decoder_text_embeddings column (the decoder's text conditioning)", "decoder_text_encoder"),
}


# tensor column -> (what it holds, the prep setting that adds it), for the optional columns no encoder makes
OPTIONAL_COLUMNS = {
    "images": ("the cropped training images", "encode.images: true"),
    "semantic_images": ("the semantic compressor's input images", "encode.semantic_images: true"),
}


def check_columns(manifest: dict, columns: list[str], url: str, purpose: str) -> None:
    """Refuses a cache without one of the tensor `columns` (other than key) that `purpose` reads."""
    for name in columns:
        if name == "key" or name in manifest["shapes"]:
            continue
        what, setting = OPTIONAL_COLUMNS.get(name, (name, f"what adds {name}"))
        raise CacheMismatchError(
            f"the cache at {url} has no {name} column ({what}), which {purpose} reads: its tensor columns are "
            f"{sorted(manifest['shapes'])}. Re-run data prep into another output URL with {setting}."
        )


def fingerprints(manifest: dict) -> dict[str, str]:
    return {name: info["fingerprint"] for name, info in manifest["encoders"].items()}


def check_fingerprints(manifest: dict, expected: dict[str, str], url: str) -> None:
    """Refuses the cache for a reader whose encoders (name -> fingerprint) are not the ones it was made with."""
    ours = fingerprints(manifest)
    for name, fingerprint in expected.items():
        if name not in ours:
            column, setting = ENCODER_OUTPUTS.get(name, (f"{name} output", name))
            raise CacheMismatchError(
                f"the cache at {url} has no {column}: it was made with the encoders {sorted(ours)}, without a {name}. "
                f"Re-run data prep into another output URL with encode.{setting} set."
            )
        if ours[name] != fingerprint:
            raise CacheMismatchError(
                f"the cache at {url} was made with a {name} of fingerprint {ours[name]} "
                f"({manifest['encoders'][name].get('weights')}), but this run's {name} has fingerprint "
                f"{fingerprint}. Re-run data prep with this {name}, or point the run at its matching cache."
            )
