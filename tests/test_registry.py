"""The model registry against real parts: an MLflow server over HTTP (sqlite, artifacts on moto's S3),
a Ray Train run whose checkpoints are registered, a consumer in a separate process, and the export
loaded by diffusers."""

import json
import os
import re
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_bucket
from test_evaluate import unreadable_except_held_out
from test_train import train_config

from pipelines import registry
from pipelines.export import export
from pipelines.promote import EvaluationFailed, GateConfig, decide, promote, rollback
from pipelines.register import register_decoders, register_stage_c
from pipelines.train import run_training
from pipelines.training import checkpoint as ckpt_io
from stages import StageC

NAME = "stage-c-tests"
# The gate on the held-out loss alone: what the tests of the registry's mechanics decide on (a 12-step
# tiny prior is not above the default gate's retrieval floor; that gate has its own test below).
LOSS_GATE = GateConfig(primary="val_loss", max_rank_vs_chance=None, tie_breaker=None, guard_rails={})


@pytest.fixture(scope="module")
def trained(tiny_cache, mlflow_server, tmp_path_factory):
    """One real training run (tiny Stage C, 2 DDP workers, checkpoints on S3) and two worse
    checkpoints made from it by adding noise to its EMA weights."""
    bucket = make_bucket("registry-runs")
    cfg = train_config(tiny_cache, f"s3://{bucket}/runs", mlflow_server, "registry-run",
                       **{"steps": 12, "checkpoint.every_steps": 12, "validation.every_steps": 12, "optim.lr": 3e-3})
    _, run_id = run_training(cfg)
    best = ckpt_io.latest(cfg.checkpoint)
    root = tmp_path_factory.mktemp("checkpoints")
    worse = []
    for i, scale in enumerate((0.6, 0.3)):
        folder = best.to_directory(str(root / f"worse-{i}"))
        model = StageC.from_pretrained(f"{folder}/ema")
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * scale * (p.std() if p.numel() > 1 else 1.0))
        model.save_pretrained(f"{folder}/ema")
        worse.append(folder)
    return {"run_id": run_id, "worse": worse, "uri": mlflow_server}


def _tags(uri: str, version: str) -> dict:
    return registry.client(uri).get_model_version(NAME, version).tags


def _alias(uri: str, alias: str) -> str | None:
    return _alias_of(uri, NAME, alias)


def _alias_of(uri: str, name: str, alias: str) -> str | None:
    found = registry.version_by_alias(registry.client(uri), name, alias)
    return found.version if found else None


def test_gate_promotes_the_better_keeps_the_worse_and_rolls_back(trained):
    uri = trained["uri"]
    assert promote(uri, NAME)["decision"] == "nothing_to_do"

    first = register_stage_c(uri, NAME, checkpoint=trained["worse"][0])
    assert first["created"] and _alias(uri, registry.CHALLENGER) == first["version"]
    decision = promote(uri, NAME, gate=LOSS_GATE)
    assert decision["decision"] == "promoted" and decision["reason"] == "first champion"
    assert _alias(uri, registry.CHAMPION) == first["version"] and _alias(uri, registry.CHALLENGER) is None

    better = register_stage_c(uri, NAME, run_id=trained["run_id"])
    tags = _tags(uri, better["version"])
    assert tags["training.run_id"] == trained["run_id"] and tags["training.step"] == "12"
    assert tags["cache.manifest_fingerprint"] and tags["code_version"] and float(tags["training.val_loss"]) > 0
    decision = promote(uri, NAME, gate=LOSS_GATE)
    assert decision["decision"] == "promoted", decision
    assert decision["challenger_val_loss"] < decision["champion_val_loss"]
    assert _alias(uri, registry.CHAMPION) == better["version"]
    tags = _tags(uri, better["version"])
    assert tags["promotion.decision"] == "promoted"
    assert float(tags["promotion.champion_val_loss"]) == pytest.approx(decision["champion_val_loss"])

    # the same run again: the version it already has, no duplicate
    again = register_stage_c(uri, NAME, run_id=trained["run_id"])
    assert again == {**better, "created": False}

    worse = register_stage_c(uri, NAME, checkpoint=trained["worse"][1])
    decision = promote(uri, NAME, gate=LOSS_GATE)
    assert decision["decision"] == "kept" and decision["challenger_val_loss"] > decision["champion_val_loss"]
    assert _alias(uri, registry.CHAMPION) == better["version"]
    assert _tags(uri, worse["version"])["promotion.decision"] == "kept"

    # a failed evaluation never promotes (nor decides anything: see the test below)
    registry.client(uri).set_registered_model_alias(NAME, registry.CHALLENGER, worse["version"])
    with pytest.raises(EvaluationFailed, match="no-such-bucket"):
        promote(uri, NAME, cache="s3://no-such-bucket/cache", gate=LOSS_GATE)
    assert _alias(uri, registry.CHAMPION) == better["version"]
    registry.client(uri).delete_registered_model_alias(NAME, registry.CHALLENGER)

    out = rollback(uri, NAME)
    assert out == {"decision": "rolled_back", "from_version": better["version"], "to_version": first["version"]}
    assert _alias(uri, registry.CHAMPION) == first["version"]
    with pytest.raises(ValueError, match="no champion before"):
        rollback(uri, NAME)
    # back to the better one for the consumer tests
    registry.set_champion(registry.client(uri), NAME, better["version"], [first["version"], better["version"]])


def test_a_failed_evaluation_decides_nothing_and_a_rerun_decides(trained, tiny_cache, tmp_path):
    """An evaluation can fail for a passing reason (here its cache is away while the gate runs): the
    challenger keeps its alias and gets no decision, so the next run of the gate decides."""
    uri = trained["uri"]
    champion = _alias(uri, registry.CHAMPION)
    shutil.copytree(trained["worse"][1], tmp_path / "candidate")
    candidate = register_stage_c(uri, NAME, checkpoint=str(tmp_path / "candidate"))["version"]
    cache, away = tmp_path / "cache", tmp_path / "away"
    shutil.copytree(tiny_cache, away)
    why = rf"(?s)no cache at {re.escape(str(cache))}.*version {candidate} keeps the alias challenger"
    with pytest.raises(EvaluationFailed, match=why):
        promote(uri, NAME, cache=str(cache), gate=LOSS_GATE)
    assert not [key for key in _tags(uri, candidate) if key.startswith("promotion.")]
    assert _alias(uri, registry.CHALLENGER) == candidate and _alias(uri, registry.CHAMPION) == champion

    away.rename(cache)
    decision = promote(uri, NAME, cache=str(cache), gate=LOSS_GATE)
    assert decision["decision"] in ("promoted", "kept") and decision["challenger_val_loss"] > 0
    assert _tags(uri, candidate)["promotion.decision"] == decision["decision"]
    assert _alias(uri, registry.CHALLENGER) is None


def _learnable_copy(cache: str, folder) -> str:
    """The cache with each row's semantic latent replaced by a seeded unit Gaussian one: the rows'
    latents independent and far apart, so that a tiny prior learns which one each caption has in a
    test's steps (measured: at the recipe's scale, z_C std ~0.024 against unit noise, it stays near
    chance for far longer; standardised, the random tiny compressor's latents still took more)."""
    import pyarrow as pa

    shutil.copytree(cache, folder)
    generator = np.random.default_rng(0)
    for entry in json.loads((folder / "manifest.json").read_text())["files"]:
        table = pq.read_table(folder / entry["path"])
        shape = table.column("stage_c_latents").combine_chunks().to_numpy_ndarray().shape
        column = pa.FixedShapeTensorArray.from_numpy_ndarray(generator.standard_normal(shape).astype(np.float16))
        pq.write_table(table.set_column(table.schema.get_field_index("stage_c_latents"), "stage_c_latents", column),
                       folder / entry["path"])
    return str(folder)


def _prior_trained_on_the_training_rows(trained, cache: str, folder, text_blind: bool, steps: int = 600) -> dict:
    """The registry run's checkpoint with its EMA weights replaced by the tiny prior trained on the
    cache's training rows (all of them every step, the trainer's loss), on their captions or,
    text_blind, with every caption dropped (the encoded "" prompt). Returns the loss of the last steps."""
    from latent_cache.reader import Cache, split
    from stages.objectives import StageCObjective, stage_c_loss

    shutil.copytree(trained["worse"][0], folder)
    table = split(Cache(cache).read_table(["key", "stage_c_latents", "text_embeddings"]), 0.2, validation=False)
    z, text = (torch.from_numpy(np.concatenate([c.to_numpy_ndarray() for c in table.column(n).chunks])).float()
               for n in ("stage_c_latents", "text_embeddings"))
    empty = train_config(cache, "unused", trained["uri"], "unused").encoders.build_text_encoder("tiny").encode([""]).detach()
    if text_blind:
        text = empty.expand_as(text)
    torch.manual_seed(0)
    model = StageC.from_flavor("tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):  # (measured: the captions' median rank ~2 of 38 from step ~600, 20 s)
        optimizer.zero_grad()
        loss = stage_c_loss(model, z, text, empty, StageCObjective(caption_dropout=0.0), generator)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(f"{folder}/ema")
    return {"loss": float(np.mean(losses[-50:])), "first_loss": float(np.mean(losses[:50]))}


def test_the_default_gate_refuses_a_text_blind_prior_and_promotes_one_that_follows_its_captions(trained, tiny_cache, tmp_path):
    """Two priors trained alike on the cache's training rows, one on their captions and one with
    every caption dropped: a prior that ignores its text, as a broken text path makes one. Its loss
    falls too, but its training captions find their own latents no better than chance, so the
    default gate refuses it, as the first champion and against one; the prior that follows its
    captions is promoted."""
    uri, name = trained["uri"], "stage-c-gate"
    cache = _learnable_copy(tiny_cache, tmp_path / "cache")
    blind = _prior_trained_on_the_training_rows(trained, cache, tmp_path / "blind", text_blind=True)
    follows = _prior_trained_on_the_training_rows(trained, cache, tmp_path / "follows", text_blind=False)
    for losses in (blind, follows):
        assert losses["loss"] < 0.8 * losses["first_loss"], (blind, follows)  # both learned

    register_stage_c(uri, name, checkpoint=str(tmp_path / "blind"))
    refused = promote(uri, name, cache=cache)
    assert refused["decision"] == "refused" and _alias_of(uri, name, registry.CHAMPION) is None, refused
    assert "do not find their own latents" in refused["reason"]
    chance = refused["challenger_chance_median_rank"]
    assert refused["challenger_train_retrieval_median_rank"] > chance / 2, refused
    assert registry.client(uri).get_model_version(name, "1").tags["promotion.decision"] == "refused"

    register_stage_c(uri, name, checkpoint=str(tmp_path / "follows"))
    promoted = promote(uri, name, cache=cache)
    assert promoted["decision"] == "promoted" and promoted["reason"] == "first champion", promoted
    assert promoted["challenger_train_retrieval_median_rank"] <= chance / 4, promoted

    registry.client(uri).set_registered_model_alias(name, registry.CHALLENGER, "1")
    again = promote(uri, name, cache=cache)
    assert again["decision"] == "refused" and _alias_of(uri, name, registry.CHAMPION) == "2", again
    # The held-out loss prefers the text-blind prior (measured 0.179 against 0.212: the captions of
    # the held-out rows are new to the one that follows its captions): a gate on it would promote it.
    loss_only = {k.removeprefix("challenger_"): v for k, v in again.items() if k.startswith("challenger_")}
    champion = {k.removeprefix("champion_"): v for k, v in again.items() if k.startswith("champion_")}
    assert loss_only["val_loss"] < champion["val_loss"], again
    assert decide(LOSS_GATE, loss_only, champion)[0] == "promoted"
    # Its text condition gap (the loss with another row's caption minus with its own) is ~0.
    assert abs(loss_only["condition_gap"]) < 0.1 * champion["condition_gap"], again


def test_evaluation_reads_only_the_held_out_rows_as_a_ray_task(trained, tiny_cache, tmp_path):
    """The held-out rows are found from the keys alone, and only they are read: every other row's
    tensors are unreadable here, and the number is the one of the intact cache. With this process
    connected to Ray (the session's local cluster), the evaluation runs as a Ray task, asking for a
    GPU only when the cluster has one."""
    import ray
    from ray.exceptions import RayTaskError

    from pipelines.evaluate import default_spec, evaluate_model, evaluation_resources, run_evaluation

    uri = trained["uri"]
    version = register_stage_c(uri, NAME, run_id=trained["run_id"])["version"]
    model = f"models:/{NAME}/{version}"
    spec = default_spec(registry.client(uri), registry.resolve_version(registry.client(uri), model), tiny_cache)
    # The training captions' retrieval reads its few training rows too (their row groups only): here
    # the held-out figures alone.
    spec.train_captions = 0
    intact = evaluate_model(model, spec, uri)
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    held = unreadable_except_held_out(cache, spec.validation_fraction)
    assert 0 < held == intact["rows"] < 38

    assert ray.is_initialized() and evaluation_resources() == {"num_cpus": 1, "num_gpus": 0}
    spec.cache = str(cache)
    result = run_evaluation(model, spec, uri)
    assert result["rows"] == held and result["val_loss"] == pytest.approx(intact["val_loss"], rel=1e-5)
    assert result["condition_gap"] == pytest.approx(intact["condition_gap"], rel=1e-4, abs=1e-7)
    # Caption -> latent retrieval on the same held-out rows, seeded: the same figures, recorded as tags.
    assert result["retrieval_median_rank"] == intact["retrieval_median_rank"] and 1 <= result["retrieval_median_rank"] <= held
    assert result["chance_median_rank"] == (held + 1) / 2 and "train_retrieval_median_rank" not in result
    tags = registry.client(uri).get_model_version(NAME, version).tags
    assert float(tags[f"eval.{result['spec_id']}.retrieval_top10"]) == pytest.approx(result["retrieval_top10"])
    spec.cache = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no cache at") as failed:
        run_evaluation(model, spec, uri)
    assert isinstance(failed.value, RayTaskError)  # raised in the task, with its cause's type here


def test_the_training_val_loss_tag_is_that_of_the_registered_weights(trained):
    """The version holds the EMA weights: its training.val_loss is what they score, the same number
    the evaluation job measures on them (same held-out rows, t grid, noise), not the trained
    weights' loss."""
    from pipelines.evaluate import evaluate_model

    uri = trained["uri"]
    version = register_stage_c(uri, NAME, run_id=trained["run_id"])["version"]
    tags = _tags(uri, version)
    assert tags["weights"] == "ema"
    measured = evaluate_model(f"models:/{NAME}/{version}", tracking_uri=uri)["val_loss"]
    assert float(tags["training.val_loss"]) == pytest.approx(measured, rel=1e-5)


def test_a_run_is_not_registered_with_a_checkpoint_it_did_not_write(trained):
    """register --run-id finds the checkpoint folder by the run's storage path and name: a run
    whose folder holds another run's checkpoint, or a checkpoint of another config, is refused."""
    from mlflow.tracking import MlflowClient

    from pipelines.training.tracking import CONFIG_HASH_TAG

    uri, client = trained["uri"], MlflowClient(trained["uri"])
    real = client.get_run(trained["run_id"])
    digest = real.data.tags.get(CONFIG_HASH_TAG)
    other = client.create_run(real.info.experiment_id, tags={CONFIG_HASH_TAG: digest} if digest else {}).info.run_id
    for key in ("checkpoint.storage_path", "checkpoint.run_name"):
        client.log_param(other, key, real.data.params[key])
    with pytest.raises(ValueError, match=rf"written by MLflow run {trained['run_id']}.*not this run's"):
        register_stage_c(uri, "stage-c-not-mine", run_id=other)

    client.set_tag(trained["run_id"], CONFIG_HASH_TAG, "0" * 16)
    try:
        with pytest.raises(ValueError, match=rf"\(run {trained['run_id']}: 0000000000000000\)"):
            register_stage_c(uri, "stage-c-not-mine", run_id=trained["run_id"])
    finally:
        if digest:
            client.set_tag(trained["run_id"], CONFIG_HASH_TAG, digest)
        else:
            client.delete_tag(trained["run_id"], CONFIG_HASH_TAG)
    assert registry.client(uri).search_model_versions("name='stage-c-not-mine'") == []


CONSUMER = """
import json, sys
import mlflow
import numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(["a red apple", "a blue car"], params={"steps": 3, "seed": 7, "guidance": 2.0})
np.save(sys.argv[2], out)
print(json.dumps({"shape": list(out.shape), "dtype": str(out.dtype)}))
"""


def test_consumer_loads_the_champion_in_a_fresh_process(trained, tmp_path):
    uri = trained["uri"]
    if _alias(uri, registry.CHAMPION) is None:
        register_stage_c(uri, NAME, run_id=trained["run_id"])
        promote(uri, NAME, gate=LOSS_GATE)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        env.pop(key, None)  # the consumer reaches the artifacts through the tracking server only
    out = subprocess.run([sys.executable, "-c", CONSUMER, f"models:/{NAME}@champion", str(tmp_path / "z.npy")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {"shape": [2, 16, 3, 3], "dtype": "float32"}  # 128 px -> ceil(128 / 42.67) = 3

    # the same numbers as our sampler on the same weights, in this process
    from pipelines.pyfunc_models import PARAMS, StageCModel, TextEncoderRef
    from stages.sampler import WuerstchenSampler

    config = registry.model_config_of(f"models:/{NAME}@champion")
    model = registry.load_stage_c(f"models:/{NAME}@champion", uri)
    sampler = WuerstchenSampler(model, TextEncoderRef.from_dict(config["text_encoder"]).load())
    ours = sampler(["a red apple", "a blue car"], height=128, width=128, prior_steps=3, prior_guidance=2.0,
                   generator=7, output="semantic", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), ours.numpy(), rtol=1e-5, atol=1e-5)
    assert set(PARAMS) >= {"steps", "timesteps", "guidance", "seed", "height", "width", "output"}
    assert StageCModel  # the class the models-from-code file builds


def test_export_loads_in_diffusers_and_matches_our_sampler(trained, tmp_path):
    from diffusers import WuerstchenPriorPipeline

    from stages.diffusers_pipeline import load_sampler

    uri = trained["uri"]
    version = register_stage_c(uri, NAME, run_id=trained["run_id"])["version"]
    earlier = register_stage_c(uri, NAME, checkpoint=trained["worse"][0])["version"]
    out = export(f"models:/{NAME}/{earlier}", tmp_path / "export", uri)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(f"models:/{NAME}/{version}", out, uri)
    # Replacing an earlier export: the new folder is swapped in whole, nothing is left beside it.
    assert export(f"models:/{NAME}/{version}", out, uri, overwrite=True) == out
    assert (out / "REGISTRY_SOURCE.txt").read_text().startswith(f"models:/{NAME}/{version}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    pipe = WuerstchenPriorPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a cat", "a dog"], height=128, width=128, num_inference_steps=4, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5), output_type="pt").image_embeddings
    ours = load_sampler(out)(["a cat", "a dog"], height=128, width=128, prior_steps=4, prior_guidance=3.0,
                             generator=5, output="semantic", progress=False)
    # e = 42 z - 1 magnifies fp32 rounding 42x (and the prior head (x - a) / |1 - b| more near b = 1):
    # 2e-4 in e is 5e-6 in z.
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=2e-4)
    registered = registry.load_stage_c(f"models:/{NAME}/{version}", uri)
    exported = StageC.from_pretrained(out / "prior")
    assert all(torch.equal(a, b) for a, b in zip(registered.state_dict().values(), exported.state_dict().values()))


def test_decoder_bundle_is_referenced_and_gives_images(trained, tmp_path):
    import mlflow
    from diffusers import WuerstchenCombinedPipeline

    uri = trained["uri"]
    bundle = register_decoders(uri, "decoders-tests", "random", flavor="tiny", seed=1)
    assert register_decoders(uri, "decoders-tests", "random", flavor="tiny", seed=1) == {**bundle, "created": False}
    name = "stage-c-with-decoders"
    version = register_stage_c(uri, name, checkpoint=trained["worse"][1], decoders=f"models:/decoders-tests/{bundle['version']}")
    tags = registry.client(uri).get_model_version(name, version["version"]).tags
    assert tags["decoders"] == f"models:/decoders-tests/{bundle['version']}"
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version['version']}")
    artifacts = registry.download(f"models:/{name}/{version['version']}", tmp_path / "artifacts")
    assert not list(artifacts.rglob("decoder")), "decoder weights must be referenced, not copied"
    images = model.predict(["a cat"], params={"output": "images", "steps": 2, "decoder_steps": 2})
    assert images.dtype == np.uint8 and images.shape == (1, 128, 128, 3)

    out = export(f"models:/{name}/{version['version']}", tmp_path / "combined", uri)
    pipe = WuerstchenCombinedPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", height=128, width=128, prior_num_inference_steps=2, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()


def test_register_decoder_bundle_from_a_hub_id(mlflow_server, tmp_path, monkeypatch, capsys):
    """The README's `wuerstchen register --decoder-bundle warp-ai/wuerstchen`, with the hub repository
    in huggingface_hub's offline cache layout (no network here): decoder/, vqgan/, text_encoder/ and
    tokenizer/ are all found in the repository."""
    from conftest import offline_hub

    from latent_cache.spec import EncoderWeights
    from latent_cache.encoders import text_fingerprint
    from pipelines.register import main
    from stages import StageA, StageB
    from stages.diffusers_pipeline import write_decoder_pipeline
    from stages.text_encoders import ClipTextEncoder

    cache = tmp_path / "hub"
    repo = cache / "models--warp-ai--wuerstchen"
    encoder = ClipTextEncoder.tiny(width=20, seed=4)
    snapshot = repo / "snapshots" / ("2" * 40)
    write_decoder_pipeline(snapshot, StageB.from_flavor("tiny"), encoder, StageA.from_flavor("tiny"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("2" * 40)
    offline_hub(monkeypatch, cache)
    monkeypatch.chdir(tmp_path)
    name = "decoders-from-hub"
    argv = ["--decoder-bundle", "warp-ai/wuerstchen", "--flavor", "tiny", "--name", name,
            "--tracking-uri", mlflow_server]
    code, out = main(argv), capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert f"registered models:/{name}/1 (from warp-ai/wuerstchen)" in out.out
    config = registry.model_config_of(f"models:/{name}/1")
    assert config["text_encoder"]["path"] == "warp-ai/wuerstchen"
    expected = text_fingerprint(encoder, EncoderWeights("warp-ai/wuerstchen"))["fingerprint"]
    assert config["text_encoder"]["fingerprint"] == expected


def test_register_a_decoder_bundle_folder_with_its_fingerprints_and_figures(mlflow_server, tmp_path):
    """What `wuerstchen demo-decoders` writes (decoder/, vqgan/, bundle.json) registers once, tagged
    with the fingerprints its Stage B was trained with (which pinning reads) and its figures; the
    version loads through models:/ with the text encoder bundle.json names and gives images."""
    from test_quality import _tiny_bundle, _write_bundle

    from pipelines.register import pinned_decoders

    stage_b, stage_a, text = _tiny_bundle(seed=5)
    _write_bundle(tmp_path, stage_b, stage_a, text, command="python -m pipelines.demo_decoders",
                  reconstruction={"figures": {"decoder_psnr": {"trained": 14.2, "random": 2.4}}},
                  training={"stage_b": {"step": 2000}})
    name = "decoders-from-folder"
    first = register_decoders(mlflow_server, name, str(tmp_path))
    assert first["created"] and register_decoders(mlflow_server, name, str(tmp_path)) == {**first, "created": False}
    client = registry.client(mlflow_server)
    version = client.get_model_version(name, first["version"])
    assert version.tags["fingerprint.semantic_compressor"] == "abc" and version.tags["reconstruction.decoder_psnr"] == "14.2"
    assert version.tags["training.stage_b.step"] == "2000" and version.tags["flavor"] == "tiny"
    assert pinned_decoders(client, name, "abc") == f"models:/{name}/{first['version']}"
    decoders = mlflow.pyfunc.load_model(f"models:/{name}/{first['version']}").unwrap_python_model()
    assert torch.equal(decoders.text_encoder.encode(["a cat"]), text.encode(["a cat"]))
    images = decoders.predict(None, {"semantic": np.zeros((1, 16, 3, 3), np.float32), "prompt": ["a cat"]},
                              params={"decoder_steps": 2})
    assert images.dtype == np.uint8 and images.shape[0] == 1

    # The same folder with the semantic compressor trained with its Stage B: another version, which
    # carries the compressor (the prior's cache must be made with it) under its fingerprint.
    from latent_cache.encoders import model_fingerprint, weights_digest
    from latent_cache.spec import EncoderWeights
    from stages import SemanticCompressor

    compressor = SemanticCompressor.from_flavor("tiny")
    compressor.save_pretrained(tmp_path / "semantic_compressor")
    meta = json.loads((tmp_path / "bundle.json").read_text())
    meta["fingerprints"]["semantic_compressor"] = model_fingerprint("semantic_compressor", compressor, EncoderWeights())["fingerprint"]
    (tmp_path / "bundle.json").write_text(json.dumps(meta))
    joint = register_decoders(mlflow_server, name, str(tmp_path))
    assert joint["created"] and joint["version"] != first["version"]
    tags = client.get_model_version(name, joint["version"]).tags
    assert tags["fingerprint.semantic_compressor"] == meta["fingerprints"]["semantic_compressor"]
    assert "encode.semantic.path" in tags["semantic_compressor"]
    root = registry.download(f"models:/{name}/{joint['version']}", tmp_path / "download")
    carried = SemanticCompressor.from_pretrained(registry.find_model_folder(root, SemanticCompressor))
    assert weights_digest(carried) == weights_digest(compressor)


def test_a_stage_c_version_pins_a_decoder_bundle_trained_on_its_semantic_latents(mlflow_server):
    """pinned_decoders on versions tagged as register tags a trained decoder bundle: by default the
    newest version of wuerstchen-decoders trained on the Stage C's semantic latents; a bare name the
    same in that bundle; a URI as given, unless its Stage B learned another compressor's latents."""
    from pipelines.register import pinned_decoders

    client = registry.client(mlflow_server)
    before = {name: len(registry.versions(client, name)) for name in (registry.DECODERS_MODEL, "my-decoders")}
    made = []
    for name, semantic in ((registry.DECODERS_MODEL, "aaa"), (registry.DECODERS_MODEL, "bbb"), (registry.DECODERS_MODEL, "aaa"),
                           (registry.DECODERS_MODEL, None), ("my-decoders", "aaa")):
        if not registry.versions(client, name) and name not in made:
            client.create_registered_model(name)
        made.append(name)
        tags = {"fingerprint.semantic_compressor": semantic} if semantic else {}
        client.create_model_version(name, "s3://nowhere/weights", tags=tags)

    def uri(name: str, n: int) -> str:  # the n-th version made here
        return f"models:/{name}/{before[name] + n}"

    default = registry.DECODERS_MODEL
    assert pinned_decoders(client, None, "aaa") == uri(default, 3)
    assert pinned_decoders(client, None, "bbb") == uri(default, 2)
    assert pinned_decoders(client, None, "ccc") is None
    assert pinned_decoders(client, "my-decoders", "aaa") == uri("my-decoders", 1)
    with pytest.raises(ValueError, match="no version of the decoder bundle my-decoders was trained on latents of this "
                                         r"Stage C's semantic compressor \(bbb\)"):
        pinned_decoders(client, "my-decoders", "bbb")
    assert pinned_decoders(client, uri(default, 4), "ccc") == uri(default, 4)
    client.set_registered_model_alias(default, "pin-test", str(before[default] + 3))
    assert pinned_decoders(client, f"models:/{default}@pin-test", "aaa") == uri(default, 3)
    with pytest.raises(ValueError, match=rf"{uri(default, 2)} \(version {before[default] + 2}\) has a Stage B trained on "
                                         "latents of the semantic compressor bbb; this Stage C was trained on latents of aaa"):
        pinned_decoders(client, uri(default, 2), "aaa")
