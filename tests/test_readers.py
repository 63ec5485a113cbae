"""Decoding and shard reading on broken web data: every fixture is built here, in tmp_path."""

import io
import json
import struct
import tarfile
import time
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from data_prep.decode import (
    READ_DROP_REASONS,
    DecodeError,
    DropReason,
    decode_caption,
    decode_image,
)
from data_prep.sources import reader
from data_prep.sources.folder import iter_folder_shard
from data_prep.sources.parquet import iter_parquet_shard
from data_prep.sources.samples import RAW_SAMPLE_KEYS, ShardSchemaError
from data_prep.sources.webdataset import iter_webdataset_shard

LOCAL = pafs.LocalFileSystem()


# -- fixtures --------------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_image(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    """Noise compresses badly, so a cut in the middle of the file lands in the pixel data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def jpeg(seed: int = 0) -> bytes:
    return encode(noise_image(seed=seed), "JPEG")


def png(seed: int = 0) -> bytes:
    return encode(noise_image(seed=seed), "PNG")


def webp(seed: int = 0) -> bytes:
    return encode(noise_image(seed=seed), "WEBP")


def write_tar(path, members, gz: bool = False):
    """members: (name, bytes) for files, or (name, "dir" | "symlink" | "fifo")."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif data == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            elif data == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def member_offsets(path) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size), to cut a tar at a chosen byte."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


def cut_file(path, length: int, out) -> str:
    out.write_bytes(path.read_bytes()[:length])
    return str(out)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, built chunk by chunk: 20000 x 20000 is ~50 KB on disk."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row * 500) for _ in range(height // 500))
    idat += compressor.compress(row * (height % 500)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def reasons(samples) -> list[tuple[str, str | None]]:
    return [(s["key"], s["drop_reason"]) for s in samples]


def check_raw_samples(samples) -> None:
    for sample in samples:
        assert tuple(sample) == RAW_SAMPLE_KEYS
        assert isinstance(json.loads(sample["metadata"]), dict)
        if sample["drop_reason"] is None:
            assert sample["image_bytes"] and sample["caption"]
        else:
            assert sample["drop_reason"] in READ_DROP_REASONS
            assert sample["image_bytes"] is None


def read_tar(path, **options) -> list[dict]:
    samples = list(iter_webdataset_shard("file://" + str(path), LOCAL, str(path), **options))
    check_raw_samples(samples)
    return samples


# -- decode_image ----------------------------------------------------------------------------------

def test_reason_strings():
    assert READ_DROP_REASONS == (
        "not_an_image", "truncated_image", "decompression_bomb", "missing_image", "missing_caption",
        "caption_not_utf8", "unsafe_member_name", "truncated_member", "unreadable_shard",
    )
    assert DropReason.UNSAFE_MEMBER_NAME == "unsafe_member_name"
    err = DecodeError(DropReason.NOT_AN_IMAGE, "html")
    assert err.reason == "not_an_image" and "html" in str(err)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed after a 90 degree clockwise turn
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.mode == "RGB" and decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_palette_png_with_transparency_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((3, 3), 1)
    decoded = decode_image(encode(image, "PNG", transparency=0))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white
    assert decoded.getpixel((3, 3)) == (255, 0, 0)


def test_rgba_alpha_composited_on_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    image.putpixel((1, 1), (0, 0, 0, 255))
    image.putpixel((2, 2), (0, 0, 0, 128))
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (0, 0, 0)
    assert all(abs(c - 127) <= 1 for c in decoded.getpixel((2, 2)))


def test_cmyk_jpeg_to_rgb():
    decoded = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    r, g, b = decoded.getpixel((8, 8))
    assert decoded.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16_bit_grey_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    values[0, 1] = 128 * 257
    decoded = decode_image(encode(Image.fromarray(values), "PNG"))
    pixels = np.asarray(decoded)
    assert decoded.mode == "RGB" and pixels.dtype == np.uint8
    assert pixels[0, 1].tolist() == [128, 128, 128]
    assert pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels[..., 0])) > 50  # a gradient, not saturated white


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("1", "PNG"), ("LA", "PNG"), ("RGB", "WEBP"), ("P", "GIF")])
def test_other_modes_to_rgb(mode, fmt):
    decoded = decode_image(encode(noise_image(16, 12).convert(mode), fmt))
    assert decoded.mode == "RGB" and decoded.size == (16, 12)


@pytest.mark.parametrize("make", [jpeg, png, webp])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_image(make, fraction):
    data = make()
    with pytest.raises(DecodeError) as caught:
        decode_image(data[: int(len(data) * fraction)])
    assert caught.value.reason == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # decode_image never flips the global


@pytest.mark.parametrize("make", [jpeg, png, webp])
def test_truncated_image_even_if_pil_global_allows_it(monkeypatch, make):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as another module might
    data = make()
    with pytest.raises(DecodeError) as caught:
        decode_image(data[: len(data) * 3 // 4])
    assert caught.value.reason == "truncated_image"
    assert decode_image(data).size == (48, 32)


@pytest.mark.parametrize(
    "data",
    [np.random.default_rng(1).bytes(3000), b"<html><body>404 Not Found</body></html>", b"", b"\x89PNG\r\n"],
)
def test_not_an_image(data):
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.reason == "not_an_image"


def test_decompression_bomb_is_refused_before_allocation(monkeypatch):
    bomb = bilevel_png(20_000, 20_000)
    assert len(bomb) < 200_000

    def no_pixels(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)
    start = time.perf_counter()
    with pytest.raises(DecodeError) as caught:
        decode_image(bomb, max_pixels=10_000_000)
    assert caught.value.reason == "decompression_bomb"
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("global_bound", [None, 10**12])
def test_decompression_bound_ignores_pil_global(monkeypatch, global_bound):
    """Another module disabling PIL's bomb check must not disable ours."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", global_bound)
    with pytest.raises(DecodeError) as caught:
        decode_image(bilevel_png(4000, 4000), max_pixels=10_000_000)
    assert caught.value.reason == "decompression_bomb"
    assert decode_image(bilevel_png(3000, 3000), max_pixels=10_000_000).size == (3000, 3000)


# -- decode_caption --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"\xef\xbb\xbfa red apple\n", "a red apple"),
        ("  a\tred\n\n apple\u00a0on  a table ", "a red apple on a table"),
        ("\ufeffcaf\u00e9", "caf\u00e9"),
        ("日本語の キャプション".encode(), "日本語の キャプション"),
    ],
)
def test_decode_caption(raw, expected):
    assert decode_caption(raw) == expected


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "missing_caption"),
        (b"", "missing_caption"),
        (" \n\t ", "missing_caption"),
        (b"\xef\xbb\xbf  ", "missing_caption"),
        (b"caf\xe9 au lait", "caption_not_utf8"),  # Latin-1
        ("lone \udcff surrogate", "caption_not_utf8"),
    ],
)
def test_decode_caption_failures(raw, reason):
    with pytest.raises(DecodeError) as caught:
        decode_caption(raw)
    assert caught.value.reason == reason


# -- webdataset ------------------------------------------------------------------------------------

def test_webdataset_reader_every_case(tmp_path):
    path = write_tar(tmp_path / "shard.tar", [
        ("000.jpg", jpeg(0)), ("000.txt", b"first caption\n"), ("000.json", b'{"url": "http://x/0", "w": 48}'),
        ("001.png", png(1)), ("001.txt", b"second"), ("001.json", b"{not json"),
        ("../evil.jpg", jpeg(2)),
        ("/abs.jpg", jpeg(3)),
        ("002.webp", webp(4)),  # no caption
        ("003.txt", b"a caption without image"),
        ("004.jpg", jpeg(5)), ("004.txt", b"caf\xe9"),  # Latin-1 caption
        ("sub", "dir"), ("sub/005.JPEG", jpeg(6)), ("sub/005.txt", b"in a folder"), ("sub/005.json", b"[1, 2]"),
        ("link.jpg", "symlink"), ("pipe.jpg", "fifo"), ("./.DS_Store", b"junk"),
        ("006.jpg", jpeg(7)), ("006.txt", b"   "),
        ("./007.jpg", jpeg(8)), ("./007.txt", b"dot slash"), ("007.cls", b"3"),
    ])
    samples = read_tar(path)
    assert reasons(samples) == [
        ("000", None), ("001", None), ("../evil.jpg", "unsafe_member_name"), ("/abs.jpg", "unsafe_member_name"),
        ("002", "missing_caption"), ("003", "missing_image"), ("004", "caption_not_utf8"),
        ("sub/005", None), ("006", "missing_caption"), ("007", None),
    ]
    by_key = {s["key"]: s for s in samples}
    assert by_key["000"]["image_bytes"] == jpeg(0) and by_key["000"]["caption"] == "first caption"
    assert json.loads(by_key["000"]["metadata"]) == {"url": "http://x/0", "w": 48}
    assert by_key["001"]["metadata"] == "{}" and by_key["001"]["image_bytes"] == png(1)  # bad json: sample kept
    assert by_key["sub/005"]["metadata"] == "{}"  # JSON, but not an object
    assert by_key["003"]["caption"] == "a caption without image"
    assert {s["source_shard"] for s in samples} == {"file://" + path}
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()


def test_webdataset_order_is_deterministic_and_scattered_members_are_grouped(tmp_path):
    path = write_tar(tmp_path / "scattered.tar", [
        ("b.jpg", jpeg(1)), ("a.jpg", jpeg(2)), ("c.txt", b"c"), ("a.txt", b"a"), ("b.txt", b"b"), ("c.png", png(3)),
    ])
    first, second = read_tar(path), read_tar(path)
    assert reasons(first) == [("b", None), ("a", None), ("c", None)]
    assert first == second
    # A window of one open key gives webdataset's contiguous grouping: scattered members are not joined.
    assert [r for _, r in reasons(read_tar(path, max_open_keys=1))].count(None) == 0


def three_sample_tar(tmp_path, gz: bool = False):
    return tmp_path / "full.tar", write_tar(tmp_path / "full.tar", [
        ("000.jpg", jpeg(0)), ("000.txt", b"zero"),
        ("001.jpg", jpeg(1)), ("001.txt", b"one"),
        ("002.jpg", jpeg(2)), ("002.txt", b"two"),
    ], gz=gz)


def test_truncated_tar_inside_a_member(tmp_path):
    full, path = three_sample_tar(tmp_path)
    _, data_at, size = member_offsets(path)["002.jpg"]
    cut = cut_file(full, data_at + size // 2, tmp_path / "cut.tar")
    samples = read_tar(cut)
    assert reasons(samples) == [("000", None), ("001", None), ("002", "truncated_member")]
    assert samples[1]["image_bytes"] == jpeg(1)


def test_truncated_tar_between_members(tmp_path):
    full, path = three_sample_tar(tmp_path)
    offsets = member_offsets(path)
    # Cut where 001.txt's header starts: 001 has its image but lost its caption.
    cut = cut_file(full, offsets["001.txt"][0], tmp_path / "cut1.tar")
    assert reasons(read_tar(cut)) == [("000", None), ("001", "truncated_member")]
    # Cut inside 002.jpg's header: 001 is complete, the cut is still recorded.
    cut = cut_file(full, offsets["002.jpg"][0] + 100, tmp_path / "cut2.tar")
    assert reasons(read_tar(cut)) == [("000", None), ("001", None), ("", "truncated_member")]


def test_truncated_gzipped_tar(tmp_path):
    full, _ = three_sample_tar(tmp_path, gz=True)
    cut = cut_file(full, int(len(full.read_bytes()) * 0.8), tmp_path / "cut.tar.gz")
    samples = read_tar(cut)
    assert samples[0]["drop_reason"] is None and samples[-1]["drop_reason"] == "truncated_member"


@pytest.mark.parametrize("content", [None, b"", b"not a tar at all" * 100])
def test_unreadable_tar(tmp_path, content):
    path = tmp_path / "bad.tar"
    if content is not None:
        path.write_bytes(content)
    samples = list(reader("webdataset").iter_shard("file://" + str(path), LOCAL, str(path)))
    assert reasons(samples) == [("", "unreadable_shard")]
    check_raw_samples(samples)


def test_empty_tar_has_no_samples(tmp_path):
    assert read_tar(write_tar(tmp_path / "empty.tar", [])) == []


# -- parquet ---------------------------------------------------------------------------------------

def test_parquet_reader(tmp_path):
    path = str(tmp_path / "shard.parquet")
    table = pa.table({
        "key": ["k0", "k1", "k2", None, "k4"],
        "caption": ["a  red\napple", "no image", None, "key is null", "   "],
        "jpg": [jpeg(0), None, png(2), webp(3), jpeg(4)],
        "url": ["http://x/0", "http://x/1", None, "http://x/3", "http://x/4"],
        "width": [48, 48, None, 48, 48],
        "score": [0.5, float("nan"), 0.25, 1.0, 0.0],
        "png": [b"x", b"y", b"z", b"w", b"v"],  # another binary column: not metadata
    })
    pq.write_table(table, path, row_group_size=2)
    samples = list(iter_parquet_shard("file://" + path, LOCAL, path, batch_size=1))
    check_raw_samples(samples)
    assert reasons(samples) == [
        ("k0", None), ("k1", "missing_image"), ("k2", "missing_caption"), ("000000003", None),
        ("k4", "missing_caption"),
    ]
    assert samples[0]["caption"] == "a red apple" and samples[0]["image_bytes"] == jpeg(0)
    assert json.loads(samples[0]["metadata"]) == {"url": "http://x/0", "width": 48, "score": 0.5}
    assert json.loads(samples[1]["metadata"])["score"] is None  # NaN -> null
    assert json.loads(samples[2]["metadata"]) == {"url": None, "width": None, "score": 0.25}
    assert samples[1]["caption"] == "no image"


def test_parquet_without_key_column_and_image_column_autodetect(tmp_path):
    path = str(tmp_path / "hf.parquet")
    images = pa.array([{"bytes": png(i), "path": f"{i}.png"} for i in range(3)])
    pq.write_table(pa.table({"image": images, "caption": ["a", "b", "c"]}), path, row_group_size=2)
    samples = list(reader("parquet").iter_shard("file://" + path, LOCAL, path))
    assert reasons(samples) == [("000000000", None), ("000000001", None), ("000000002", None)]
    assert samples[2]["image_bytes"] == png(2) and samples[2]["metadata"] == "{}"

    path = str(tmp_path / "image_col.parquet")
    pq.write_table(pa.table({"image": [webp(0)], "text": ["hi"], "key": [7]}), path)
    [sample] = iter_parquet_shard("file://" + path, LOCAL, path, caption_column="text")
    assert (sample["key"], sample["caption"], sample["drop_reason"]) == ("7", "hi", None)


def test_parquet_missing_columns_is_a_clear_error(tmp_path):
    path = str(tmp_path / "nothing.parquet")
    pq.write_table(pa.table({"picture": [b"x"], "caption": ["c"]}), path)
    with pytest.raises(ValueError, match=r"nothing\.parquet.*no image column.*picture"):
        list(reader("parquet").iter_shard("file://" + path, LOCAL, path))
    with pytest.raises(ShardSchemaError, match="picture"):
        list(iter_parquet_shard("file://" + path, LOCAL, path, caption_column="alt"))
    with pytest.raises(ShardSchemaError, match="'webp'"):  # an explicit column is never replaced
        list(iter_parquet_shard("file://" + path, LOCAL, path, image_column="webp"))


def test_parquet_corrupt_row_group_and_unreadable_file(tmp_path):
    path = tmp_path / "corrupt.parquet"
    keys = [f"k{i}" for i in range(6)]
    table = pa.table({"key": keys, "caption": ["c"] * 6, "jpg": [bytes([i]) * 500 for i in range(6)]})
    pq.write_table(table, path, row_group_size=3, use_dictionary=False)
    page = pq.ParquetFile(path).metadata.row_group(0).column(2).data_page_offset
    data = bytearray(path.read_bytes())
    data[page : page + 8] = b"\xff" * 8  # garbage page header in the first row group's image column
    path.write_bytes(bytes(data))
    samples = list(reader("parquet").iter_shard("file://" + str(path), LOCAL, str(path)))
    check_raw_samples(samples)
    assert reasons(samples) == [(f"k{i}", "truncated_member") for i in range(3)] + [(f"k{i}", None) for i in (3, 4, 5)]

    cut = cut_file(path, len(data) // 2, tmp_path / "cut.parquet")  # the footer is gone
    assert reasons(reader("parquet").iter_shard("file://" + cut, LOCAL, cut)) == [("", "unreadable_shard")]


# -- folders ---------------------------------------------------------------------------------------

def test_folder_reader(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    files = {
        "a.jpg": jpeg(0), "a.txt": b"apple", "a.json": b'{"src": "camera"}',
        "B.PNG": png(1), "B.txt": b"banana\n",
        "c.webp": webp(2),  # no caption
        "d.txt": b"caption only",
        "e.jpeg": jpeg(3), "e.txt": b"\xff\xfe",
        "f.jpg": jpeg(4), "f.txt": b"fig", "f.json": b"{broken",
        "notes.md": b"ignored", ".hidden.jpg": jpeg(5), "sub/g.jpg": jpeg(6), "sub/g.txt": b"not read here",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    url = "file://" + str(folder)
    samples = list(iter_folder_shard(url, LOCAL, str(folder)))
    check_raw_samples(samples)
    assert reasons(samples) == [
        ("B", None), ("a", None), ("c", "missing_caption"), ("d", "missing_image"), ("e", "caption_not_utf8"),
        ("f", None),
    ]
    by_key = {s["key"]: s for s in samples}
    assert by_key["a"]["image_bytes"] == jpeg(0) and json.loads(by_key["a"]["metadata"]) == {"src": "camera"}
    assert by_key["B"]["caption"] == "banana" and by_key["f"]["metadata"] == "{}"
    assert samples == list(reader("folder").iter_shard(url, LOCAL, str(folder)))
    assert reasons(reader("folder").iter_shard(url, LOCAL, str(tmp_path / "missing"))) == [("", "unreadable_shard")]


# -- every reason, end to end ----------------------------------------------------------------------

def test_every_drop_reason_is_counted(tmp_path):
    """Read + decode like the pipeline does: each reason of READ_DROP_REASONS shows up, nothing raises."""
    tar = write_tar(tmp_path / "web.tar", [
        ("ok.jpg", jpeg(0)), ("ok.txt", b"fine"),
        ("html.jpg", b"<html>404</html>"), ("html.txt", b"page"),
        ("cut.png", png(1)[:300]), ("cut.txt", b"short"),
        ("bomb.png", bilevel_png(20_000, 20_000)), ("bomb.txt", b"boom"),
        ("noimage.txt", b"alone"), ("nocap.jpg", jpeg(2)), ("latin.jpg", jpeg(3)), ("latin.txt", b"\xe9t\xe9"),
        ("../up.jpg", jpeg(4)), ("last.jpg", jpeg(5)), ("last.txt", b"cut here"),
    ])
    cut = cut_file(tmp_path / "web.tar", member_offsets(tar)["last.jpg"][1] + 100, tmp_path / "web-cut.tar")
    counts = Counter()
    for path in (cut, str(tmp_path / "absent.tar")):
        for sample in reader("webdataset").iter_shard("file://" + path, LOCAL, path):
            reason = sample["drop_reason"]
            if reason is None:
                try:
                    decode_image(sample["image_bytes"], max_pixels=10_000_000)
                except DecodeError as err:
                    reason = err.reason
            counts[reason] += 1
    assert counts == Counter({None: 1, **{reason: 1 for reason in READ_DROP_REASONS}})


# -- list_shards -----------------------------------------------------------------------------------

def test_list_shards_local(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("shard-00001.tar", "shard-00000.tar", "other-00000.tar", "x.parquet", "00000_stats.json"):
        (data / name).write_bytes(b"")
    (data / "nested").mkdir()
    (data / "nested" / "deep.tar").write_bytes(b"")

    fs, shards = reader("webdataset").list_shards(str(data))
    assert isinstance(fs, pafs.LocalFileSystem)
    names = ["other-00000.tar", "shard-00000.tar", "shard-00001.tar"]
    assert shards == [(f"file://{data}/{n}", f"{data}/{n}") for n in names]
    assert reader("webdataset").list_shards(f"file://{data}/")[1] == shards
    assert reader("webdataset").list_shards(f"{data}/shard-*.tar")[1] == shards[1:]
    assert reader("webdataset").list_shards(f"file://{data}/shard-0000[1].tar")[1] == shards[2:]
    assert reader("parquet").list_shards(f"{data}/x.parquet")[1] == [(f"file://{data}/x.parquet", f"{data}/x.parquet")]
    assert reader("parquet").list_shards(str(data))[1] == [(f"file://{data}/x.parquet", f"{data}/x.parquet")]
    single = f"{data}/00000_stats.json"  # a file named explicitly is a shard, whatever its suffix
    assert reader("webdataset").list_shards("file://" + single)[1] == [("file://" + single, single)]


def test_list_shards_folders(tmp_path):
    root = tmp_path / "photos"
    for sub in ("cats", "dogs", "empty"):
        (root / sub).mkdir(parents=True)
    (root / "top.JPG").write_bytes(b"")
    (root / "cats" / "c.png").write_bytes(b"")
    (root / "dogs" / "d.webp").write_bytes(b"")
    (root / "empty" / "readme.txt").write_bytes(b"")
    _, shards = reader("folder").list_shards(str(root))
    assert [url for url, _ in shards] == [f"file://{root}", f"file://{root}/cats", f"file://{root}/dogs"]
    assert [p for _, p in reader("folder").list_shards(f"{root}/d*")[1]] == [f"{root}/dogs"]
    (root / "top.JPG").unlink()
    assert [p for _, p in reader("folder").list_shards(str(root))[1]] == [f"{root}/cats", f"{root}/dogs"]


@pytest.mark.parametrize(
    "where, fmt",
    [("missing", "webdataset"), ("data", "webdataset"), ("data/shard-*.tar", "webdataset"), ("data", "folder")],
)
def test_list_shards_nothing_found(tmp_path, where, fmt):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.parquet").write_bytes(b"")
    url = f"{tmp_path}/{where}"
    with pytest.raises(FileNotFoundError) as caught:
        reader(fmt).list_shards(url)
    assert url in str(caught.value) and fmt in str(caught.value)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="tfrecord"):
        reader("tfrecord").list_shards(str(tmp_path))
    with pytest.raises(ValueError, match="tfrecord"):
        list(reader("tfrecord").iter_shard("file:///x", LOCAL, "/x"))
