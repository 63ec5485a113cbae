"""The main job end to end on a reduced setting (one shard of the demo's Twemoji, a few steps), as the README's
first command runs it: a fresh working directory, a local Ray cluster, an sqlite MLflow store."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration  # the demo job in its own process, with its own Ray and MLflow

from core.ray_cluster import RAY_INTERNAL_LINES

REPO = Path(__file__).resolve().parents[1]


def test_demo_prepares_trains_registers_gates_and_serves(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--limit-shards", "1", "--steps", "10", "--pictures", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for heading in ("== 1. Data prep", "== 2. Training", "== 3. Registration", "== 4. Evaluation", "== 5. A consumer"):
        assert heading in done.stdout
    assert "mlflow ui --backend-store-uri" in done.stdout
    # the committed demo decoders (tests/test_demo_decoders.py), not random ones
    assert "Stage B + Stage A trained on Twemoji (weights/twemoji-small-decoders" in done.stdout
    # Whether the prior follows its captions, in numbers beside chance: the gate's retrieval of held-out
    # and training captions and the consumer's own-latent ranks. Ten steps do not teach the prior its
    # captions: the gate refuses it (a prior at chance is never promoted), and the consumer loads the
    # version by number.
    for which in ("held-out", "training"):
        assert re.search(rf"{which} caption -> latent retrieval: median rank \d+ \(chance \d+\), top-10 \d+%", done.stdout)
    assert re.search(r"refused: its training captions do not find their own latents", done.stdout), done.stdout[-3000:]
    assert "no champion: the gate refused models:/wuerstchen-stage-c/1" in done.stdout
    assert "== 5. A consumer loads models:/wuerstchen-stage-c/1 in a fresh process" in done.stdout
    # every caption of the cache (one shard: 64 emoji, 63 after the exact-duplicate filter), training and
    # held-out apart, and 4 pictures
    assert "predict(63 captions of the cache) -> latents (63, 16, 6, 6) float32; predict(output='images') for 4" in done.stdout
    for which in ("training", "held-out"):
        assert re.search(rf"{which} captions \(\d+\) -> latent among all 63 cached: median rank \d+ \(chance 32\), "
                         r"top-1 \d+%, top-10 \d+%", done.stdout), done.stdout[-3000:]
    assert re.search(r"caption -> image: each picture's own emoji among all 63 by pixel distance: median rank \d+ "
                     r"\(chance 32\), top-1 \d+%, top-10 \d+%", done.stdout)
    # A console a person can read: Ray's internal lines and its progress reports (no terminal shows
    # them live here) stay in Ray's log files; each rank-0 step line is shown once.
    console = (done.stdout + done.stderr).splitlines()
    forwarded = [line for line in console if re.search(r"\((\w+ )?pid=\d+\)", line)]  # from Ray's workers
    assert not [line for line in forwarded if any(internal in line for internal in RAY_INTERNAL_LINES)]
    assert "RayDeprecationWarning" not in done.stderr
    assert "Downloading artifacts" not in done.stderr, done.stderr[done.stderr.find("Downloading artifacts") - 2000:][:3000]
    assert not [line for line in console if "Running Dataset" in line or "logging_progress" in line]
    steps = [line for line in console if re.search(r"step \d+/10: loss", line)]
    assert steps and len(steps) == len(set(steps)), steps
    assert len(console) < 300, "\n".join(console)

    import mlflow

    from pipelines import registry

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = registry.client(uri)
    version = client.get_model_version(registry.STAGE_C_MODEL, "1")
    assert version.tags["promotion.decision"] == "refused" and not version.aliases
    assert version.tags["decoders"].startswith(f"models:/{registry.DECODERS_MODEL}/")
    # The prior's cache was made with the semantic compressor the demo decoders were trained with,
    # so the version pins that bundle (their fingerprints agree).
    from pipelines import decoder_bundle

    bundle = decoder_bundle.read_meta(decoder_bundle.DEMO_DECODERS)
    assert version.tags["fingerprint.semantic_compressor"] == bundle["fingerprints"]["semantic_compressor"]
    image = np.asarray(Image.open(tmp_path / "runs" / "demo" / "consumer_image.png"))
    assert image.shape == (256, 256, 3) and image.std() > 5, "a picture, not a blank"
    latents = np.load(tmp_path / "runs" / "demo" / "consumer_latents.npy")
    assert latents.shape == (63, 16, 6, 6) and latents.dtype == np.float32 and np.isfinite(latents).all()
    # the sample grid: 4 tiles of (real emoji | generated), captions under them, also in the training run
    grid = np.asarray(Image.open(tmp_path / "runs" / "demo" / "samples.png"))
    assert grid.shape[1] == 4 * (2 * 96 + 4) and grid.std() > 5
    run_id = version.tags["training.run_id"]
    assert [a.path for a in client.list_artifacts(run_id, "demo")] == ["demo/samples.png"]
    # training's sample grid at its validation (the last step): the demo decoders' pictures of 8 captions
    assert "validation/step_00000010.png" in [a.path for a in client.list_artifacts(run_id, "validation")]
    metrics = client.get_run(run_id).data.metrics
    assert {"demo_training_median_rank", "demo_held_out_top10", "demo_image_top10"} <= metrics.keys()
    model = mlflow.pyfunc.load_model(f"models:/{registry.STAGE_C_MODEL}/1")
    again = model.predict(["grinning face"], params={"steps": 3})
    assert again.shape == (1, 16, 6, 6) and np.isfinite(again).all()
