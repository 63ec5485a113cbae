import random

import pytest
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Replaces every floating tensor of `module` with seeded random values, so that no zero-initialised
    gate (GRN, Stage A gammas, output heads) hides a difference. Output heads get a smaller std to keep
    the (x - a) / b parameterisation well conditioned, BatchNorm variances stay positive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif key.startswith(("out.", "clf.")):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    return module


def random_stage_c_kwargs(seed: int) -> dict:
    rng = random.Random(seed)
    nhead = rng.choice([1, 2, 3, 4])
    return dict(
        c_in=rng.choice([4, 8, 16]),
        c=nhead * rng.choice([8, 12, 16]),
        c_cond=rng.choice([12, 24, 40]),
        c_r=rng.choice([32, 63, 64]),  # 63: the odd width is zero-padded
        depth=rng.randint(1, 3),
        nhead=nhead,
        dropout=rng.choice([0.0, 0.1, 0.3]),
    )


def random_stage_b_kwargs(seed: int) -> dict:
    rng = random.Random(seed)
    levels = rng.randint(2, 4)
    c_hidden, nhead, level_config = [], [], []
    for i in range(levels):
        heads = rng.choice([1, 2, 4])
        c_hidden.append(heads * rng.choice([4, 8]) * (i + 1))
        config = rng.choice(["CT", "CTA", "CA", "CAT"]) if i > 0 else rng.choice(["C", "CT"])
        level_config.append(config)
        nhead.append(heads if "A" in config else -1)
    inject = [False] + [rng.random() < 0.7 for _ in range(levels - 1)]
    return dict(
        c_in=4,
        c_out=4,  # the head computes (x - a) / b, so c_out must equal c_in
        c_r=rng.choice([32, 64]),
        patch_size=rng.choice([1, 2]),
        c_cond=rng.choice([16, 24]),
        c_hidden=c_hidden,
        nhead=nhead,
        blocks=[rng.randint(1, 2) for _ in range(levels)],
        level_config=level_config,
        inject_effnet=inject,
        effnet_embd=rng.choice([8, 16]),
        clip_embd=rng.choice([12, 20]),
        kernel_size=rng.choice([3, 5]),
        dropout=0.1,
    )


def random_stage_a_kwargs(seed: int) -> dict:
    rng = random.Random(seed)
    levels = rng.randint(1, 3)
    return dict(
        in_channels=3,
        out_channels=3,
        up_down_scale_factor=rng.choice([1, 2]),
        levels=levels,
        bottleneck_blocks=rng.randint(1, 3),
        embed_dim=rng.choice([16, 24, 32]) * 2**levels // 2,
        latent_channels=rng.choice([4, 6]),
        num_vq_embeddings=rng.choice([32, 100]),
        scale_factor=rng.choice([0.3764, 0.5]),
    )


def offline_hub(monkeypatch, cache):
    """Hugging Face hub calls see only `cache`, offline (no weights can be downloaded here)."""
    # huggingface_hub reads its environment once, at import: patch its constants as well.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


# -- real services, started once per test session ------------------------------------------------

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# The session's real services. A test that uses one of them, directly or through a fixture that
# does, is an integration test; so is one that starts its own server or runs the project's code in a
# child process (a job, the CLI, a consumer): those say so with `pytest.mark.integration`. Every other
# test is a unit test: in process, nothing started, seconds at most (`make test-unit`).
REAL_SERVICES = frozenset({"s3_server", "ray_cluster", "mlflow_server", "tiny_cache", "decoder_cache"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        # fixturenames is the closure: the fixtures a test's fixtures depend on are in it too.
        real = item.get_closest_marker("integration") or REAL_SERVICES.intersection(item.fixturenames)
        item.add_marker("integration" if real else "unit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: held open together while they are picked, since one port picked
    and released at a time can come back twice (a Ray head refuses two components on one port)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server over HTTP on loopback; the standard AWS variables point every client at it.

    Started before Ray, so that Ray's workers inherit the same environment."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for_port(port, process=process)
        yield env["AWS_ENDPOINT_URL"]
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_bucket(name: str) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return name


# Read by Ray Train's controller, which inherits its cluster's environment: it looks at its workers
# every 2 s by default, up to 2 s lost at the start, the end and each restart of every one of the
# suite's ~20 training runs.
TRAIN_POLLING = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """One real local Ray cluster for the session (4 logical CPUs: actors never starve the tasks)."""
    import ray

    temp_dir = tmp_path_factory.mktemp("ray")
    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in TRAIN_POLLING.items():
            monkeypatch.setenv(key, value)  # the cluster's processes keep it; this one does not
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(temp_dir), log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server over HTTP on loopback, sqlite backend, artifacts on moto's S3
    (served through the server: clients need no AWS settings)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    bucket = make_bucket("mlflow-artifacts")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_S3_ENDPOINT_URL": s3_server}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{bucket}/artifacts", "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        wait_for_port(port, timeout=120, process=process)
        _wait_healthy(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process, log)


def stop_server(process: subprocess.Popen, log) -> None:
    """Stops a server the suite started (killed when it takes more than 20 s) and closes its log."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _wait_healthy(url: str, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def tiny_cache(ray_cluster, tmp_path_factory):
    """A latent cache of 38 rows (an odd number per shard: the workers' shares are uneven), tiny
    encoders at 128 px, shared by the training and registry tests."""
    from prep_factory import plain_shards

    from data_prep.config import PrepConfig
    from data_prep.runner import run_prep
    from core.config import load

    root = tmp_path_factory.mktemp("train-data")
    source = plain_shards(root / "src", shards=2, per_shard=19)
    output = root / "cache"
    cfg = load(PrepConfig, None, [
        f"source.url={source}", "source.format=webdataset", f"output.url={output}", "encode.flavor=tiny",
        "encode.resolution=128", "encode.batch_size=16", "output.shards_per_wave=2",
    ])
    summary = run_prep(cfg)
    assert summary["rows_written"] == 38
    return str(output)


@pytest.fixture(scope="session")
def decoder_cache(ray_cluster, tmp_path_factory):
    """A tiny cache with everything prep can add: the Stage A latents and the decoder's text
    conditioning (what Stage B learns from), the cropped images (what Stage A learns), the semantic
    compressor's input images (what it learns from when trained with Stage B), and the prior's text
    as tokens (tokens mode)."""
    from prep_factory import plain_shards

    from core.config import load
    from data_prep.config import PrepConfig
    from data_prep.runner import run_prep

    root = tmp_path_factory.mktemp("decoder-data")
    source = plain_shards(root / "src", shards=2, per_shard=19, seed0=500)
    cfg = load(PrepConfig, None, [
        f"source.url={source}", "source.format=webdataset", f"output.url={root / 'cache'}", "encode.flavor=tiny",
        "encode.resolution=128", "encode.batch_size=16", "encode.text_mode=tokens", "encode.stage_a={}",
        "encode.decoder_text_encoder={seed: 1}", "encode.images=true", "encode.semantic_images=true",
    ])
    assert run_prep(cfg)["rows_written"] == 38
    return str(root / "cache")
