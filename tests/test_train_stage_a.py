"""Stage A (the VQGAN) as another task of the same trainer, on the cache's images: it overfits a
handful of images to a stated PSNR and reconstructs each image, not an average one; a cache without
images is refused naming what is missing; and a run on Ray Train (DDP, 2 CPU workers) recovers from
a killed worker, checkpoints a Stage A that prep can encode with, and resumes."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_train import metric_history, train_config
from test_train_data_order import _kill_when_stalled
from torchmetrics.functional.image import peak_signal_noise_ratio

from core.storage import resolve
from latent_cache import manifest as manifests
from latent_cache.encoders import build_stage_a, calibration_images, model_fingerprint, spec_fingerprints, weights_digest
from latent_cache.manifest import CacheMismatchError
from latent_cache.spec import CacheSpec, EncoderWeights
from pipelines.quality import stage_a_reconstruction
from pipelines.train import run_training
from pipelines.training import checkpoint as ckpt_io
from pipelines.training.config import ModelConfig
from pipelines.training.tasks import StageATask
from stages import StageA
from stages.objectives import StageAObjective

STAGE_A = {"model.stage": "a", "model.flavor": "tiny"}


def test_stage_a_overfits_four_images_and_reconstructs_each_one_not_an_average():
    """Four 32 px pictures, 400 steps: the quantized reconstructions reach 24 dB PSNR (from ~6), at
    least 6 dB above what the best single image (their mean) scores, and each reconstruction is
    nearer its own image than any other. A decoder that ignored its latents could do no better than
    the mean; one fed another row's latents would be nearer that row. On one thread: the figures of
    400 steps then do not depend on how many cores the machine splits the kernels over (on two they
    ended 0.3 dB lower, at 23.8 dB)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _overfit_four_images()
    finally:
        torch.set_num_threads(threads)


def _overfit_four_images():
    torch.manual_seed(0)
    task = StageATask(ModelConfig(stage="a", flavor="tiny"), StageAObjective()).setup(torch.device("cpu"))
    model = task.build_model()
    images = calibration_images(1, count=4, side=32)
    batch = {"key": [f"row-{i}" for i in range(4)], "images": images}
    start = stage_a_reconstruction(model, [images], quantize=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        optimizer.zero_grad()
        task.loss(model, batch, generator).backward()
        optimizer.step()
    trained = stage_a_reconstruction(model, [images], quantize=True)
    mean_image = peak_signal_noise_ratio(images.mean(0, keepdim=True).expand_as(images), images, data_range=1.0,
                                         reduction="none", dim=(1, 2, 3))
    assert start["psnr"] < 10 and trained["psnr"] > 24, (start, trained)
    assert trained["psnr"] > float(mean_image.max()) + 6, (trained, mean_image)
    with torch.no_grad():
        model.eval()
        reconstruction, _ = model(images)
    distances = torch.cdist(reconstruction.flatten(1), images.flatten(1))
    assert distances.argmin(dim=1).tolist() == [0, 1, 2, 3], distances
    # Decoded without quantizing (how Würstchen v2 decodes Stage B's latents) it reconstructs too.
    assert stage_a_reconstruction(model, [images], quantize=False)["psnr"] > 20


def test_random_crops_are_squares_of_each_image_drawn_from_the_generator():
    from stages.objectives import random_crops, stage_a_loss

    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    crops = random_crops(images, 8, torch.Generator().manual_seed(0))
    again = random_crops(images, 8, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 8, 8) and torch.equal(crops, again)
    for image, crop in zip(images, crops):  # a contiguous window of its own image
        y, x = divmod(int(crop[0, 0, 0]) - int(image[0, 0, 0]), 16)
        assert torch.equal(crop, image[:, y : y + 8, x : x + 8])
    model = StageA.from_flavor("tiny")
    assert torch.isfinite(stage_a_loss(model, images / images.max(), StageAObjective(crop=8), torch.Generator()))
    with pytest.raises(ValueError, match=r"crop 32 is larger than the images \(16x16\)"):
        random_crops(images, 32)


def test_the_objective_is_checked():
    with pytest.raises(ValueError, match="crop must be a positive multiple of 4"):
        StageAObjective(crop=30)
    with pytest.raises(ValueError, match=r"reconstruction must be one of \('mse', 'l1'\), got 'lpips'"):
        StageAObjective(reconstruction="lpips")


def test_a_cache_without_images_is_refused_for_stage_a_naming_the_setting(tmp_path):
    spec = CacheSpec(flavor="tiny", resolution=64, text_mode="embeddings", semantic=EncoderWeights(),
                     text_encoder=EncoderWeights())
    encoders, width = spec_fingerprints(spec)
    fs, root = resolve(str(tmp_path / "cache"))
    manifests.write(fs, root, manifests.new_manifest(spec, encoders, width, {}))
    cfg = train_config(str(tmp_path / "cache"), str(tmp_path / "runs"), "http://127.0.0.1:1", "a", **STAGE_A)
    with pytest.raises(CacheMismatchError, match=r"has no images column \(the cropped training images\), which Stage A "
                                                  r"training reads.*with encode.images: true"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()


def test_stage_a_recovers_from_a_killed_worker_from_its_checkpoint_and_saves_a_stage_a_prep_can_use(
        decoder_cache, mlflow_server, tmp_path):
    """4 steps on 2 DDP workers, rank 0's process SIGKILLed at step 3: the run restarts from the
    checkpoint of step 2 (the same weights digest), logs every step once, and its EMA Stage A loads
    as prep's encode.stage_a."""
    storage, marker = str(tmp_path / "runs"), tmp_path / "stalled"
    killed: list[str] = []
    killer = threading.Thread(target=_kill_when_stalled, args=(marker, killed), daemon=True)
    killer.start()
    cfg = train_config(decoder_cache, storage, mlflow_server, "vqgan", steps=4, max_failures=1, **STAGE_A, **{
        "checkpoint.every_steps": 2, "validation.every_steps": 2, "tracking.experiment": "tests-stage-a", "optim.lr": 3e-3,
        "fault.fail_at_step": 3, "fault.rank": 0, "fault.action": "stall", "fault.marker": str(marker)})
    result, run_id = run_training(cfg)
    killer.join(timeout=10)
    assert len(killed) == 1, "the stalled Ray Train worker was not found alive and killed"
    assert result.metrics["step"] == 4
    assert [s for s, _ in metric_history(mlflow_server, run_id, "loss")] == [1, 2, 3, 4], "every step logged once"
    for figure in ("val_loss_ema", "val_psnr_ema", "val_ssim_ema", "val_psnr_raw"):
        history = metric_history(mlflow_server, run_id, figure)
        assert [s for s, _ in history] == [2, 4] and all(np.isfinite(v) for _, v in history), figure
    assert 0 < metric_history(mlflow_server, run_id, "val_psnr_ema")[-1][1] < 60
    # What a person looks at: held-out images over their reconstructions, at each validation.
    pictures = [f.path for f in MlflowClient(mlflow_server).list_artifacts(run_id, "validation")]
    assert pictures == ["validation/step_00000002.png", "validation/step_00000004.png"], pictures
    local = MlflowClient(mlflow_server).download_artifacts(run_id, pictures[-1], str(tmp_path))
    from PIL import Image

    assert Image.open(local).size[1] == 2 * 128  # two rows of 128 px images

    fs, root = cfg.checkpoint.storage()
    step_2 = ckpt_io.read(Path(root) / "vqgan" / ckpt_io.checkpoint_name(2))
    model = StageA.from_flavor("tiny")
    model.load_state_dict(step_2["model"])
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert tags["resume.step_2.weights_sha256"] == weights_digest(model)

    with ckpt_io.latest(cfg.checkpoint).as_directory() as folder:
        saved = ckpt_io.read(Path(folder))
        ema_folder = tmp_path / "stage_a_ema"
        StageA.from_pretrained(f"{folder}/ema").save_pretrained(ema_folder)
    assert saved["train_state"]["step"] == 4 and "val_psnr_ema" in saved["train_state"]["validation"]
    # What the trained Stage A is for: prep encodes a decoder cache with it (encode.stage_a.path).
    weights = EncoderWeights(path=str(ema_folder))
    assert weights_digest(build_stage_a("tiny", weights)) == weights_digest(StageA.from_pretrained(ema_folder))
    assert model_fingerprint("stage_a", build_stage_a("tiny", weights), weights)["fingerprint"] != \
        model_fingerprint("stage_a", build_stage_a("tiny", EncoderWeights()), EncoderWeights())["fingerprint"]

    from pipelines.register import register_checkpoint

    with pytest.raises(ValueError, match="is a Stage A checkpoint: .* encode.stage_a.path"):
        register_checkpoint(mlflow_server, run_id=run_id)
