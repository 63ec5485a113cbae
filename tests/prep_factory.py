"""Source data for the data-prep tests: webdataset shards with good samples and every kind of bad one."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (96, 80), fmt: str = "JPEG") -> bytes:
    """A distinct picture per seed (blocks of random colours: far apart in pHash)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good(key: str, seed: int, fmt: str = "JPEG", ext: str = "jpg", caption: str | None = None, size=(96, 80)):
    meta = json.dumps({"width": size[0], "height": size[1], "aesthetic": 6.0})
    return [
        (f"{key}.{ext}", image_bytes(seed, size, fmt)),
        (f"{key}.txt", (caption or f"picture number {seed}").encode()),
        (f"{key}.json", meta.encode()),
    ]


def broken_shards(folder: Path) -> tuple[list[str], dict[str, int]]:
    """Two shards; returns (keys that must reach the cache, expected drops per reason).

    Filters expected: min_side 64, max_pixels 1,000,000, exact dedup on."""
    folder.mkdir(parents=True, exist_ok=True)
    duplicate = image_bytes(1)
    bomb = io.BytesIO()
    Image.new("L", (1200, 1000)).save(bomb, format="PNG")  # 1.2 Mpx > the 1 Mpx bound of the test config
    members = (
        good("a/good-jpg", 1)
        + good("a/good-png", 2, "PNG", "png")
        + good("a/good-webp", 3, "WEBP", "webp")
        + [("a/trunc.jpg", image_bytes(4)[:300]), ("a/trunc.txt", b"a cut jpeg")]
        + [("a/noise.jpg", bytes(np.random.default_rng(5).integers(0, 256, 2000, dtype=np.uint8))), ("a/noise.txt", b"noise")]
        + [("a/bomb.png", bomb.getvalue()), ("a/bomb.txt", b"too many pixels")]
        + [("a/latin1.jpg", image_bytes(6)), ("a/latin1.txt", "caf\xe9".encode("latin-1"))]
        + [("a/nocaption.jpg", image_bytes(7))]
        + [("a/noimage.txt", b"a caption alone")]
        + [("../escape.jpg", image_bytes(8)), ("/etc/abs.jpg", image_bytes(9))]
        + good("a/tiny", 10, size=(32, 40))
        + [("a/dup.jpg", duplicate), ("a/dup.txt", b"the first picture again")]
    )
    write_tar(folder / "shard-000.tar", members)
    # The second shard is cut in the middle of its third sample's image.
    whole = write_tar(folder / "full.tar", good("b/one", 11) + good("b/two", 12) + good("b/three", 13))
    data = whole.read_bytes()
    three = data.index(b"b/three.jpg")
    (folder / "shard-001.tar").write_bytes(data[: three + 512 + 700])
    whole.unlink()
    kept = ["a/good-jpg", "a/good-png", "a/good-webp", "b/one", "b/two"]
    dropped = {
        "truncated_image": 1,
        "not_an_image": 1,
        "decompression_bomb": 1,
        "caption_not_utf8": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "unsafe_member_name": 2,
        "too_small": 1,
        "duplicate_exact": 1,
        "truncated_member": 1,
    }
    return kept, dropped


def plain_shards(folder: Path, shards: int, per_shard: int, seed0: int = 100) -> Path:
    """`shards` tars of `per_shard` good samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        members = []
        for i in range(per_shard):
            members += good(f"s{s}/img{i}", seed0 + s * per_shard + i)
        write_tar(folder / f"shard-{s:03d}.tar", members)
    return folder


def kill_after_first_commit_and_rerun(sets: list[str], output: Path, ray_address: str, shards: int) -> None:
    """Runs `wuerstchen prep` with `sets` in a child process, kills it (SIGKILL) once it has committed
    its first wave and before its last, then reruns it to the end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pipelines.prep", *[arg for kv in sets for arg in ("--set", kv)]]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest = output / "manifest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed:\n{process.stdout.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    committed = json.loads(manifest.read_text())
    assert 1 <= len(committed["shards"]) < shards, "the kill must land between the first and the last commit"
    rerun = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
