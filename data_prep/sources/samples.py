"""The raw sample every source reader yields, and what the readers share.

A raw sample is a plain dict with exactly the keys of `RAW_SAMPLE_KEYS`:

    {"key": str, "source_shard": str, "caption": str | None, "image_bytes": bytes | None,
     "metadata": str (a JSON object as text, "{}" when none), "drop_reason": str | None}

A sample that cannot be used still comes out, with `drop_reason` set and `image_bytes` None, so
that the pipeline counts it instead of losing it or crashing on it. Captions are decoded by the
readers (their problems get their reason there); images stay bytes, decoded later by `data_prep.decode`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from core.storage import raise_for_storage_error
from data_prep.decode import DecodeError, DropReason, decode_caption

log = logging.getLogger(__name__)

RAW_SAMPLE_KEYS = ("key", "source_shard", "caption", "image_bytes", "metadata", "drop_reason")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset member / folder file extensions


class ShardSchemaError(ValueError):
    """A parquet shard lacks the columns the job was configured for. Raised (not turned into a
    dropped sample) because it is a configuration mistake that every shard would repeat."""


def raw_sample(
    key: str,
    source_shard: str,
    *,
    caption: str | None = None,
    image_bytes: bytes | None = None,
    metadata: str = "{}",
    drop_reason: str | None = None,
) -> dict:
    """The one place a raw sample dict is built, so every reader yields the same keys."""
    if drop_reason is not None:
        image_bytes = None
    return {
        "key": key,
        "source_shard": source_shard,
        "caption": caption,
        "image_bytes": image_bytes,
        "metadata": metadata,
        "drop_reason": drop_reason,
    }


def try_caption(data: bytes | str | None) -> tuple[str | None, str | None]:
    """(caption, None) or (None, drop reason): caption problems are reasons, not exceptions."""
    try:
        return decode_caption(data), None
    except DecodeError as err:
        return None, err.reason


def metadata_text(data: bytes | None) -> str:
    """A JSON sidecar passed through as text; "{}" when absent, not UTF-8, not JSON, or not an
    object. Broken metadata costs the metadata, never the sample."""
    if data is None:
        return "{}"
    try:
        text = data.decode("utf-8-sig")
        return text if isinstance(json.loads(text), dict) else "{}"
    except (UnicodeDecodeError, ValueError):
        return "{}"


def salvaged(samples: Iterator[dict], url: str, path: str) -> Iterator[dict]:
    """The samples of one shard, never raising for bad data: a shard that cannot be opened at all
    (missing, not a tar/parquet) yields one `unreadable_shard` sample (key ""), and a failure a reader
    did not foresee after some samples yields one `truncated_member` (key ""). `ShardSchemaError`
    (parquet columns not as configured) and a `StorageError` (access denied) are raised: they are the
    job's mistakes, which every shard would repeat.
    """
    yielded = 0
    try:
        for sample in samples:
            yielded += 1
            yield sample
    except ShardSchemaError:
        raise
    except Exception as err:  # noqa: BLE001 - one bad shard must not fail the job
        if isinstance(err, OSError):
            # ... but a refusal (or a missing bucket) is the job's setup, not a bad shard: counted as
            # unreadable, the shard would be committed and never read again.
            raise_for_storage_error(err, path)
        reason = DropReason.TRUNCATED_MEMBER if yielded else DropReason.UNREADABLE_SHARD
        log.warning("shard %s: %s after %d samples (%s: %s)", url, reason, yielded, type(err).__name__, err)
        yield raw_sample("", url, drop_reason=reason)
