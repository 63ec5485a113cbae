"""Stage B (the diffusion decoder) as another task of the same trainer: its loss learns what its
semantic condition says (an overfitting check), a cache without what it learns is refused naming
it, and a run on Ray Train (FSDP2, 2 CPU workers) recovers from a killed worker, checkpoints a
decoder and registers it."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_train import metric_history, train_config
from test_train_data_order import _kill_when_stalled

from core.config import load
from core.storage import resolve
from data_prep.config import PrepConfig
from latent_cache import manifest as manifests
from latent_cache.encoders import spec_fingerprints, weights_digest
from latent_cache.manifest import CacheMismatchError
from latent_cache.spec import CacheSpec, EncoderWeights
from pipelines.train import run_training
from pipelines.training import checkpoint as ckpt_io
from pipelines.training.config import ModelConfig, TrainConfig, ValidationConfig
from pipelines.training.tasks import StageBTask
from stages import SemanticCompressor, StageA, StageB
from stages.stage_b_with_compressor import StageBWithCompressor
from stages.latents import semantic_to_stage_c
from stages.objectives import StageBObjective

STAGE_B = {"model.stage": "b"}


def test_stage_b_overfits_a_handful_of_latents_and_follows_its_semantic_condition():
    """Four Stage A latents, each with its own semantic latent: after 300 steps the fixed-grid loss is
    a fraction of the start's, and several times lower with each latent's own condition than with
    the conditions shifted by one. A decoder that ignored its condition (or got another row's)
    would score the same both ways."""
    torch.manual_seed(0)
    task = StageBTask(ModelConfig(stage="b", flavor="tiny"), StageBObjective(effnet_dropout=0.0), ValidationConfig())
    task.setup(torch.device("cpu"))
    model = task.build_model()
    n = 4
    h = torch.randn(n, 4, 16, 16) * 0.3764  # z_B = h / 0.3764 of unit variance, as the recipe scales it
    e = torch.randn(n, 16, 4, 4)
    batch = {"key": [f"row-{i}" for i in range(n)], "stage_a_latents": h, "stage_c_latents": semantic_to_stage_c(e),
             "decoder_text_embeddings": torch.randn(1, 77, 32).expand(n, 77, 32)}  # one caption: e tells the rows apart

    def held_out(order: list[int]) -> float:
        rows = {k: (v if k == "key" else v.numpy()) for k, v in batch.items()}
        rows["stage_c_latents"] = rows["stage_c_latents"][order]
        return task.validation_loss(model, [rows])["loss"]

    own, shifted = list(range(n)), [1, 2, 3, 0]
    start = held_out(own)
    assert start == pytest.approx(held_out(shifted))  # the output layer starts at zero
    assert task.validation_loss(model, [{k: (v if k == "key" else v.numpy()) for k, v in batch.items()}])[
        "condition_gap"] == pytest.approx(0.0, abs=1e-6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        optimizer.zero_grad()
        task.loss(model, batch, generator).backward()
        optimizer.step()
    trained, wrong = held_out(own), held_out(shifted)
    assert trained < 0.2 * start, (start, trained)
    assert wrong > 2.5 * trained, (trained, wrong)
    # The figure the trainer logs beside val_loss: each row given the next row's condition.
    rows = {k: (v if k == "key" else v.numpy()) for k, v in batch.items()}
    halves = [{k: v[:2] for k, v in rows.items()}, {k: v[2:] for k, v in rows.items()}]  # across batches
    figures = task.validation_loss(model, halves)
    assert figures["loss"] == pytest.approx(trained, rel=1e-5)
    assert figures["condition_gap"] == pytest.approx(wrong - trained, rel=1e-4)


def test_the_stage_and_its_overrides_are_checked():
    with pytest.raises(ValueError, match=r"model.stage must be one of \['a', 'b', 'c'\], got 'd'"):
        load(TrainConfig, None, ["model.stage=d"])
    with pytest.raises(ValueError, match=r"unknown Stage B fields \['depth'\]"):
        load(TrainConfig, None, ["model.stage=b", "model.flavor=tiny", "model.overrides={depth: 2}"])
    cfg = load(TrainConfig, None, ["model.stage=b", "model.flavor=tiny", "model.overrides={c_cond: 16}"])
    assert isinstance(cfg.model.build(), StageB) and cfg.model.model_config().c_cond == 16
    with pytest.raises(ValueError, match="this model is not a Stage C"):
        cfg.model.stage_c_config()


@pytest.mark.parametrize("missing", ["stage_a", "decoder_text_encoder"])
def test_a_cache_without_what_stage_b_needs_is_refused_naming_it(missing, tmp_path):
    """A cache made for Stage C only (no Stage A latents, or no decoder text conditioning) is refused
    before Ray or MLflow start, with the column it lacks and the prep setting that adds it."""
    spec = CacheSpec(flavor="tiny", resolution=128, text_mode="embeddings", semantic=EncoderWeights(),
                     text_encoder=EncoderWeights(), stage_a=EncoderWeights(), decoder_text_encoder=EncoderWeights())
    if missing == "stage_a":
        spec = CacheSpec(**{**spec.__dict__, "stage_a": None})
    else:
        spec = CacheSpec(**{**spec.__dict__, "decoder_text_encoder": None})
    encoders, width = spec_fingerprints(spec)
    fs, root = resolve(str(tmp_path / "cache"))
    manifests.write(fs, root, manifests.new_manifest(spec, encoders, width, {}))
    cfg = train_config(str(tmp_path / "cache"), str(tmp_path / "runs"), "http://127.0.0.1:1", "b", **STAGE_B)
    column = {"stage_a": "stage_a_latents", "decoder_text_encoder": "decoder_text_embeddings"}[missing]
    with pytest.raises(CacheMismatchError, match=rf"has no {column} column .*with encode.{missing} set"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()


def test_stage_b_trains_on_two_fsdp2_workers_recovers_from_a_killed_worker_and_checkpoints_a_decoder(
        decoder_cache, mlflow_server, tmp_path):
    """4 steps on 2 FSDP2 workers, rank 0's process SIGKILLed at step 3: the run restarts from the
    checkpoint of step 2 (the same weights digest) and logs every step once; its checkpoint holds a
    decoder in the diffusers layout, registered as a decoder bundle."""
    storage, marker = str(tmp_path / "runs"), tmp_path / "stalled"
    sets = STAGE_B | {"model.flavor": "tiny", "parallel.strategy": "fsdp2", "encoders.decoder_text_encoder.seed": 1,
                      "checkpoint.every_steps": 2, "validation.every_steps": 2, "tracking.experiment": "tests-stage-b",
                      "fault.fail_at_step": 3, "fault.rank": 0, "fault.action": "stall", "fault.marker": str(marker)}
    killed: list[str] = []
    killer = threading.Thread(target=_kill_when_stalled, args=(marker, killed), daemon=True)
    killer.start()
    cfg = train_config(decoder_cache, storage, mlflow_server, "decoder", steps=4, max_failures=1, **sets)
    result, run_id = run_training(cfg)
    killer.join(timeout=10)
    assert len(killed) == 1, "the stalled Ray Train worker was not found alive and killed"
    assert result.metrics["step"] == 4
    assert [s for s, _ in metric_history(mlflow_server, run_id, "loss")] == [1, 2, 3, 4], "every step logged once"
    val = metric_history(mlflow_server, run_id, "val_loss_ema")
    assert [s for s, _ in val] == [2, 4] and all(np.isfinite(v) for _, v in val)
    gap = metric_history(mlflow_server, run_id, "val_condition_gap_ema")  # does it use its semantic condition
    assert [s for s, _ in gap] == [2, 4] and all(np.isfinite(v) for _, v in gap)
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert {"fingerprint.stage_a", "fingerprint.decoder_text_encoder", "fingerprint.semantic_compressor"} <= set(tags)
    fs, root = cfg.checkpoint.storage()
    model = StageB.from_flavor("tiny")
    model.load_state_dict(ckpt_io.read(Path(root) / "decoder" / ckpt_io.checkpoint_name(2))["model"])
    assert tags["resume.step_2.weights_sha256"] == weights_digest(model)

    with ckpt_io.latest(cfg.checkpoint).as_directory() as folder:
        saved = ckpt_io.read(folder)
        ema = StageB.from_pretrained(f"{folder}/ema")  # a decoder in the diffusers layout
    assert saved["train_state"]["step"] == 4 and ema.config == StageB.flavor_config("tiny")

    # Registered as what it is: a new version of the decoder bundle (not a Stage C), with the Stage A
    # and the decoder text encoder of its cache, loadable through models:/.
    import mlflow

    from pipelines.register import register_checkpoint, register_stage_c

    with pytest.raises(ValueError, match="is a checkpoint of Stage B, not of Stage C"):
        register_stage_c(mlflow_server, "stage-c-tests-b", run_id=run_id)
    bundle = register_checkpoint(mlflow_server, "decoders-trained", run_id=run_id)
    assert register_checkpoint(mlflow_server, "decoders-trained", run_id=run_id) == {**bundle, "created": False}
    version = MlflowClient(mlflow_server).get_model_version("decoders-trained", bundle["version"])
    assert version.tags["training.run_id"] == run_id and version.tags["training.step"] == "4"
    assert float(version.tags["training.val_loss"]) == pytest.approx(metric_history(mlflow_server, run_id, "val_loss_ema")[-1][1], rel=1e-5)
    assert version.tags["fingerprint.stage_a"] == tags["fingerprint.stage_a"]
    with ckpt_io.latest(cfg.checkpoint).as_directory() as folder:
        trained_ema = weights_digest(StageB.from_pretrained(f"{folder}/ema"))
    decoders = mlflow.pyfunc.load_model(f"models:/decoders-trained/{bundle['version']}").unwrap_python_model()
    assert weights_digest(decoders.stage_b) == trained_ema
    # A registered bundle is where a fine-tune of the decoders starts: model.init=models:/... gives
    # its Stage B (model.stage b) or its Stage A (model.stage a).
    from pipelines.train import initial_weights

    bundle_uri = f"models:/decoders-trained/{bundle['version']}"
    for stage, expected in (("b", trained_ema), ("a", weights_digest(decoders.stage_a))):
        init = train_config(decoder_cache, storage, mlflow_server, "x", **{"model.stage": stage, "model.init": bundle_uri})
        holder = (StageB if stage == "b" else StageA).from_flavor("tiny")
        holder.load_state_dict(initial_weights(init))
        assert weights_digest(holder) == expected, stage
    semantic = np.random.default_rng(0).standard_normal((1, 16, 3, 3)).astype(np.float32)
    images = decoders.predict(None, {"semantic": semantic, "prompt": ["a cat"]}, params={"decoder_steps": 2})
    assert images.dtype == np.uint8 and images.shape[0] == 1 and images.shape[-1] == 3



def test_stage_b_trained_with_its_compressor_on_ddp_workers_registers_the_compressor_with_the_decoders(
        decoder_cache, mlflow_server, tmp_path):
    """2 DDP workers, 4 steps, the compressor trained with Stage B on the cache's semantic_images:
    the checkpoint holds both as diffusers folders. Registered, the bundle carries the trained
    compressor, and its fingerprint (not the cache's compressor's) is what the version is tagged
    with: what a prior cache made with that folder (prep encode.semantic.path) records, and what
    pins a Stage C to this bundle."""
    import tempfile

    from latent_cache.encoders import model_fingerprint
    from latent_cache.spec import EncoderWeights
    from pipelines import registry
    from pipelines.register import pinned_decoders, register_checkpoint

    sets = STAGE_B | {"model.train_semantic_compressor": True, "encoders.decoder_text_encoder.seed": 1,
                      "checkpoint.every_steps": 2, "validation.every_steps": 2, "tracking.experiment": "tests-stage-b"}
    cfg = train_config(decoder_cache, str(tmp_path / "runs"), mlflow_server, "joint", steps=4, **sets)
    result, run_id = run_training(cfg)
    assert result.metrics["step"] == 4
    gap = metric_history(mlflow_server, run_id, "val_condition_gap_ema")
    assert [s for s, _ in gap] == [2, 4] and all(np.isfinite(v) for _, v in gap)
    with ckpt_io.latest(cfg.checkpoint).as_directory() as folder:
        trained = StageBWithCompressor.from_pretrained(f"{folder}/ema")
    start = cfg.encoders.build_semantic_compressor("tiny")
    assert weights_digest(trained.semantic_compressor) != weights_digest(start), "the compressor did not train"
    fingerprint = model_fingerprint("semantic_compressor", trained.semantic_compressor, EncoderWeights())["fingerprint"]
    cache_fingerprint = model_fingerprint("semantic_compressor", start, EncoderWeights())["fingerprint"]
    assert fingerprint != cache_fingerprint

    client = MlflowClient(mlflow_server)
    bundle = register_checkpoint(mlflow_server, "decoders-joint", run_id=run_id)
    version = client.get_model_version("decoders-joint", bundle["version"])
    assert version.tags["fingerprint.semantic_compressor"] == fingerprint
    assert "encode.semantic.path" in version.tags["semantic_compressor"]
    with tempfile.TemporaryDirectory() as tmp:
        root = registry.download(f"models:/decoders-joint/{bundle['version']}", tmp)
        compressor = SemanticCompressor.from_pretrained(registry.find_model_folder(root, SemanticCompressor))
        stage_b = StageB.from_pretrained(registry.find_model_folder(root, StageB))
    assert weights_digest(compressor) == weights_digest(trained.semantic_compressor)
    assert weights_digest(stage_b) == weights_digest(trained.stage_b)
    uri = f"models:/decoders-joint/{bundle['version']}"
    assert pinned_decoders(client, "decoders-joint", fingerprint) == uri  # a prior on this compressor's latents
    with pytest.raises(ValueError, match="trained on latents of the semantic compressor"):
        pinned_decoders(client, uri, cache_fingerprint)  # a prior on the untrained compressor's latents

def test_the_shipped_stage_b_config_goes_with_the_shipped_decoder_prep_config():
    """configs/train_stage_b_twemoji_small.yaml trains on the cache that prep_twemoji_decoders.yaml makes:
    the encoders it expects are the ones that prep records (else every run of it would be refused)."""
    from pathlib import Path

    from pipelines.train import expected_fingerprints

    configs = Path(__file__).resolve().parents[1] / "configs"
    prep = load(PrepConfig, configs / "prep_twemoji_decoders.yaml")
    train = load(TrainConfig, configs / "train_stage_b_twemoji_small.yaml")
    assert train.data.cache == prep.output.url and train.model.flavor == prep.encode.flavor
    recorded, _ = spec_fingerprints(prep.encode.spec())
    expected, decoder_text = expected_fingerprints(train)
    assert expected == {name: recorded[name]["fingerprint"] for name in expected}
    assert decoder_text.width == train.model.model_config().clip_embd
    stage_a = load(TrainConfig, configs / "train_stage_a_twemoji_small.yaml")  # the images of the same cache
    assert stage_a.model.stage == "a" and stage_a.data.cache == prep.output.url and prep.encode.images


def test_a_run_of_the_days_before_stage_b_resumes_and_another_stage_is_refused():
    """A checkpoint (or MLflow run) written before model.stage, encoders.stage_a, ... existed lacks
    those keys: at their defaults they change nothing, so it resumes; another value is a change."""
    import dataclasses
    import json

    from core.config import ConfigError
    from pipelines.train import check_resumable
    from pipelines.training.tracking import config_changes, flatten

    def config_of(*sets: str) -> dict:  # as the driver compares it with a checkpoint's
        return json.loads(json.dumps(dataclasses.asdict(load(TrainConfig, None, ["model.flavor=tiny", *sets]))))

    config = config_of()
    older = {k: v for k, v in config.items() if k != "decoder_objective"}
    older["model"] = {k: v for k, v in config["model"].items() if k != "stage"}
    older["encoders"] = {k: v for k, v in config["encoders"].items() if not k.startswith(("stage_a", "decoder_"))}
    check_resumable(older, config, "ckpt")
    assert config_changes(flatten(older), config) == []
    as_b = config_of("model.stage=b")
    assert config_changes(flatten(older), as_b) == ["model.stage: (absent) -> b"]
    with pytest.raises(ConfigError, match=r"checkpoint ckpt was trained with another config \(model.stage: \(absent\) -> b\)"):
        check_resumable(older, as_b, "ckpt")
    changed = config_of("optim.lr=0.5")
    assert config_changes(flatten(older), changed) == ["optim.lr: 0.0001 -> 0.5"]


def test_stage_b_trains_at_the_scale_factor_of_its_stage_a(tmp_path):
    """Stage B learns h / decoder_objective.scale_factor; the sampler decodes with the Stage A's own
    config.scale_factor. A Stage A trained here has its own factor (the demo's: 0.9539): training at
    another one is refused before any work, naming the value to set."""
    from pipelines.train import expected_fingerprints

    torch.manual_seed(0)
    stage_a = StageA.from_flavor("tiny", scale_factor=0.9)
    stage_a.save_pretrained(tmp_path / "vqgan")
    sets = ["model.stage=b", "model.flavor=tiny", f"encoders.stage_a.path={tmp_path / 'vqgan'}",
            "encoders.decoder_text_encoder={seed: 1}"]
    with pytest.raises(ValueError, match=r"scale_factor=0.9 \(its config.json\).*set decoder_objective.scale_factor=0.9"):
        expected_fingerprints(load(TrainConfig, None, sets))
    expected, _ = expected_fingerprints(load(TrainConfig, None, [*sets, "decoder_objective.scale_factor=0.9"]))
    assert set(expected) == {"semantic_compressor", "stage_a", "decoder_text_encoder"}


def _joint_rows(n: int = 4, side: int = 64) -> dict:
    """n rows as the cache gives them to Stage B trained with its compressor: key, Stage A latents,
    the compressor's input images (uint8 HWC) and one shared caption's decoder text."""
    gen = np.random.default_rng(0)
    coarse = gen.integers(0, 256, (n, side // 8, side // 8, 3)).astype(np.uint8)
    images = coarse.repeat(8, axis=1).repeat(8, axis=2)  # blocky pictures, distinct to a stride-32 network
    return {"key": np.asarray([f"row-{i}" for i in range(n)], dtype=object),
            "stage_a_latents": (gen.standard_normal((n, 4, 16, 16)) * 0.3764).astype(np.float32),
            "semantic_images": images,
            "decoder_text_embeddings": np.repeat(gen.standard_normal((1, 77, 32)).astype(np.float32), n, axis=0)}


def test_stage_b_trained_with_its_semantic_compressor_learns_latents_that_tell_the_images_apart():
    """Stage B with a trainable (tiny, random) semantic compressor on four images: after 500 steps
    the loss with each row's own compressor input is a fraction of the start's, and several times
    lower than with the inputs shifted by one row; the logged condition gap says the same. Feeding
    the compressor the wrong images, or dropping its output, would score both alike."""
    from pipelines.training.data import to_tensors

    torch.manual_seed(0)
    model_cfg = ModelConfig(stage="b", flavor="tiny", train_semantic_compressor=True)
    task = StageBTask(model_cfg, StageBObjective(effnet_dropout=0.0), ValidationConfig())
    task.setup(torch.device("cpu"))
    assert task.columns == ["key", "stage_a_latents", "semantic_images", "decoder_text_embeddings"]
    model = task.build_model()
    assert isinstance(model, StageBWithCompressor)
    rows = _joint_rows()
    shifted = {**rows, "semantic_images": np.roll(rows["semantic_images"], -1, axis=0)}
    start = task.validation_loss(model, [rows])
    batch = to_tensors(rows, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    compressor_before = {k: v.clone() for k, v in model.semantic_compressor.state_dict().items()}
    for _ in range(500):  # (measured: own / shifted 1.7x at 300 steps, 3.5x at 500)
        optimizer.zero_grad()
        task.loss(model, batch, generator).backward()
        optimizer.step()
    trained, wrong = task.validation_loss(model, [rows]), task.validation_loss(model, [shifted])
    assert trained["loss"] < 0.2 * start["loss"], (start, trained)
    assert wrong["loss"] > 2.5 * trained["loss"], (trained, wrong)
    assert trained["condition_gap"] == pytest.approx(wrong["loss"] - trained["loss"], rel=1e-4)
    changed = [k for k, v in model.semantic_compressor.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, compressor_before[k])]
    assert any(k.startswith("backbone.") for k in changed) and "mapper.0.weight" in changed, "the compressor was not trained"


def test_stage_b_with_its_compressor_is_one_module_saved_as_two_loadable_folders(tmp_path):
    torch.manual_seed(0)
    model = StageBWithCompressor(StageBWithCompressor.flavor_config("tiny"))
    rows = _joint_rows(2)
    images = torch.rand(2, 3, 64, 64)
    x, r, clip = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8]), torch.from_numpy(rows["decoder_text_embeddings"])
    model.eval()
    with torch.no_grad():
        e = model.semantic_compressor(images)
        torch.testing.assert_close(model(x, r, images, clip), model.stage_b(x, r, e, clip))
        dropped = model(x, r, images, clip, keep=torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(dropped[0], model.stage_b(x, r, e, clip)[0])
        torch.testing.assert_close(dropped[1], model.stage_b(x[1:], r[1:], torch.zeros_like(e[1:]), clip[1:])[0])
    model.save_pretrained(tmp_path / "joint")
    assert StageB.from_pretrained(tmp_path / "joint" / "decoder").config == model.config.stage_b
    loaded = StageBWithCompressor.from_pretrained(tmp_path / "joint")
    assert weights_digest(loaded) == weights_digest(model) and loaded.config == model.config
    # Through the checkpoint writer and reader, as the trainer saves it.
    state = {"config": {"model": {"stage": "b", "train_semantic_compressor": True}}, "step": 1}
    ckpt_io.write(tmp_path / "ckpt", model.config, model.state_dict(), None, None, state)
    assert ckpt_io.saved_model_class(state) is StageBWithCompressor
    assert ckpt_io.read(tmp_path / "ckpt")["model"].keys() == model.state_dict().keys()


def test_training_the_semantic_compressor_is_checked_and_starts_from_the_configured_compressor():
    from pipelines.train import initial_weights

    with pytest.raises(ValueError, match="model.train_semantic_compressor is for Stage B"):
        load(TrainConfig, None, ["model.train_semantic_compressor=true"])
    cfg = load(TrainConfig, None, ["model.stage=b", "model.flavor=tiny", "model.train_semantic_compressor=true",
                                   "model.overrides={clip_embd: 24}"])
    assert cfg.model.model_class is StageBWithCompressor and cfg.model.stage_b_config().clip_embd == 24
    init = initial_weights(cfg)  # no model.init: the compressor of encoders.semantic, Stage B from scratch
    assert init.keys() == {f"semantic_compressor.{k}" for k in SemanticCompressor.from_flavor("tiny").state_dict()}
    expected = cfg.encoders.build_semantic_compressor("tiny")
    model = cfg.model.build(init)
    assert weights_digest(model.semantic_compressor) == weights_digest(expected)
    with pytest.raises(RuntimeError, match="Missing key"):  # part of a Stage B is not a start
        cfg.model.build({**init, "stage_b.embedding.1.weight": model.stage_b.embedding[1].weight})


def test_the_demo_decoders_stage_b_config_goes_with_its_prep_configs():
    """The demo's Stage B (trained with its semantic compressor) reads what prep_twemoji_stage_b.yaml
    puts in its cache, starts from the compressor the prior's demo cache (prep_twemoji.yaml) is made
    with, and the decoders' images cache holds the compressor inputs its build measures on."""
    from pathlib import Path

    from pipelines.training.tasks import STAGE_B_WITH_COMPRESSOR_COLUMNS

    configs = Path(__file__).resolve().parents[1] / "configs"
    prep = load(PrepConfig, configs / "prep_twemoji_stage_b.yaml")
    train = load(TrainConfig, configs / "train_stage_b_twemoji_demo.yaml")
    assert train.model.train_semantic_compressor and train.data.cache == prep.output.url
    shapes = prep.encode.spec().tensor_shapes(text_width=64, decoder_text_width=128)
    assert set(STAGE_B_WITH_COMPRESSOR_COLUMNS) - {"key"} <= set(shapes)
    assert train.encoders.semantic == load(PrepConfig, configs / "prep_twemoji.yaml").encode.semantic
    assert train.encoders.stage_a == prep.encode.stage_a and train.encoders.decoder_text_encoder == prep.encode.decoder_text_encoder
    assert load(PrepConfig, configs / "prep_twemoji_decoders.yaml").encode.semantic_images
