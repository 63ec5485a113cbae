"""The per-sample filters and the funnel that counts what each of them dropped.

Every dropped sample carries exactly one reason: the first rule it broke, in funnel order. The
funnel is written next to the cache (manifest.json) and printed at the end of a run.
"""

import json
from collections.abc import Iterable, Mapping

from data_prep.config import FilterConfig
from data_prep.decode import DropReason as R

# Reasons in the order the pipeline applies them; reading and decoding (names from data_prep.decode) come first.
READ_REASONS = (
    R.UNREADABLE_SHARD, R.UNSAFE_MEMBER_NAME, R.TRUNCATED_MEMBER, R.MISSING_IMAGE, R.MISSING_CAPTION, R.CAPTION_NOT_UTF8,
)
DECODE_REASONS = (R.NOT_AN_IMAGE, R.TRUNCATED_IMAGE, R.DECOMPRESSION_BOMB)
RULE_REASONS = (
    "too_small",
    "too_large",
    "aspect_ratio",
    "caption_too_short",
    "caption_too_long",
    "metadata_missing",
    "metadata_threshold",
)
LATE_REASONS = ("clip_score", "duplicate_exact", "duplicate_near")
FUNNEL_ORDER = READ_REASONS + DECODE_REASONS + RULE_REASONS + LATE_REASONS


class FilterConfigError(ValueError):
    """A filter that cannot work on this source (e.g. a threshold on a column it lacks)."""


def metadata_value(metadata: Mapping, key: str):
    """The value of a metadata key; "a|b" takes the first alternative the sample has."""
    for alternative in key.split("|"):
        if metadata.get(alternative) is not None:
            return metadata[alternative]
    return None


def check_rules(width: int, height: int, caption: str, metadata: Mapping, cfg: FilterConfig) -> str | None:
    """The first size / aspect / caption / metadata rule the sample breaks, or None."""
    short, long = min(width, height), max(width, height)
    if short < cfg.min_side:
        return "too_small"
    if cfg.max_side is not None and long > cfg.max_side:
        return "too_large"
    if cfg.max_aspect is not None and long / short > cfg.max_aspect:
        return "aspect_ratio"
    if len(caption) < cfg.min_caption_chars or len(caption.split()) < cfg.min_caption_words:
        return "caption_too_short"
    if cfg.max_caption_chars is not None and len(caption) > cfg.max_caption_chars:
        return "caption_too_long"
    for key, threshold in cfg.metadata.items():
        value = metadata_value(metadata, key)
        if value is None:
            return "metadata_missing"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "metadata_missing"
        if (threshold.min is not None and value < threshold.min) or (threshold.max is not None and value > threshold.max):
            return "metadata_threshold"
    return None


def check_metadata_columns(samples: Iterable[Mapping], cfg: FilterConfig, source: str) -> None:
    """Refuses thresholds on metadata keys that none of the first samples of the source has: such a
    threshold would drop everything (or, in other tools, silently pass everything)."""
    if not cfg.metadata:
        return
    seen: set[str] = set()
    looked_at = 0
    for sample in samples:
        if sample.get("drop_reason"):  # a dropped sample says nothing about the columns
            continue
        looked_at += 1
        seen.update(json.loads(sample.get("metadata") or "{}").keys())
    if looked_at == 0:
        return
    for key in cfg.metadata:
        if not any(alternative in seen for alternative in key.split("|")):
            raise FilterConfigError(
                f"filters.metadata has a threshold on {key!r}, but the first {looked_at} samples of {source} "
                f"have no such metadata (they have: {sorted(seen) or 'none'}). Remove the threshold or "
                f"point at a source that has the column."
            )


def funnel(dropped: Mapping[str, int], rows_in: int) -> list[dict]:
    """Per reason, in pipeline order: rows that reached that check and rows it dropped."""
    rows = []
    remaining = rows_in
    order = list(FUNNEL_ORDER) + sorted(set(dropped) - set(FUNNEL_ORDER))
    for reason in order:
        count = int(dropped.get(reason, 0))
        if count:
            rows.append({"reason": reason, "seen": remaining, "dropped": count})
            remaining -= count
    return rows
