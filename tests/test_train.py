"""Stage C training on Ray Train with 2 CPU workers, against real parts: a local Ray cluster, moto's
S3 server for checkpoints, an MLflow server over HTTP."""

import numpy as np
import pytest
import torch
from conftest import make_bucket
from mlflow.tracking import MlflowClient
from prep_factory import plain_shards

from core.storage import resolve
from latent_cache.manifest import CacheMismatchError
from data_prep.config import PrepConfig
from data_prep.runner import run_prep
from core.config import load
from pipelines.train import run_training
from pipelines.training import checkpoint as ckpt_io
from pipelines.training.config import TrainConfig
from stages import StageC


def train_config(cache: str, storage: str, uri: str, run_name: str, **sets) -> TrainConfig:
    base = {
        "model.flavor": "tiny", "data.cache": cache, "data.batch_size": 4, "data.validation_fraction": 0.2,
        "steps": 6, "checkpoint.every_steps": 3, "checkpoint.storage_path": storage, "checkpoint.run_name": run_name,
        "validation.every_steps": 3, "tracking.tracking_uri": uri, "tracking.log_every": 1, "tracking.experiment": "tests",
        "parallel.num_workers": 2, "parallel.cpus_per_worker": 0.5, "ema.decay": 0.9, "optim.lr": 1e-3,
    }
    base.update(sets)
    return load(TrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metricmetric_history(run_id, key)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_workers_train_checkpoint_to_s3_and_track_in_mlflow(tiny_cache, mlflow_server, strategy):
    bucket = make_bucket(f"train-{strategy}")
    cfg = train_config(tiny_cache, f"s3://{bucket}/runs", mlflow_server, f"run-{strategy}", **{"parallel.strategy": strategy})
    result, run_id = run_training(cfg)
    assert result.metrics["step"] == 6
    steps = [s for s, _ in metric_history(mlflow_server, run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    for key in ("val_loss_ema", "val_loss_raw"):  # the EMA weights (registered) and the trained ones
        val = metric_history(mlflow_server, run_id, key)
        assert [s for s, _ in val] == [3, 6] and all(np.isfinite(v) for _, v in val), key
    for key in ("lr", "grad_norm", "samples_per_s", "data_wait_fraction"):
        assert len(metric_history(mlflow_server, run_id, key)) == 6, key
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["parallel.strategy"] == strategy
    artifacts = [a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id)]
    assert "cache_manifest.json" in artifacts

    latest = ckpt_io.latest(cfg.checkpoint)
    assert latest is not None and latest.path.endswith("checkpoint_00000006")
    fs, root = resolve(f"s3://{bucket}/runs")
    with latest.as_directory() as folder:
        state = ckpt_io.read(folder)
        ema = StageC.from_pretrained(f"{folder}/ema")
    assert state["train_state"]["step"] == 6 and state["train_state"]["mlflow_run_id"] == run_id
    assert ema.config == StageC.flavor_config("tiny")
    # EMA (decay 0.9 over 6 steps) lies between the start and the trained weights: not equal to either
    assert any(not torch.equal(ema.state_dict()[k], state["model"][k]) for k in state["model"])


def test_resume_continues_from_the_checkpoint_with_the_saved_weights(tiny_cache, mlflow_server, tmp_path):
    storage = str(tmp_path / "runs")
    _, first_run = run_training(train_config(tiny_cache, storage, mlflow_server, "resume", steps=3))
    saved = ckpt_io.read(tmp_path / "runs" / "resume" / "checkpoint_00000003")

    result, second_run = run_training(train_config(tiny_cache, storage, mlflow_server, "resume", steps=6))
    assert second_run == first_run, "a resumed run continues its MLflow run"
    assert [s for s, _ in metric_history(mlflow_server, first_run, "loss")] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert result.metrics["step"] == 6
    tags = MlflowClient(mlflow_server).get_run(first_run).data.tags
    assert tags["resume.step_3.weights_sha256"] == weights_digest_of(saved["model"])


def weights_digest_of(state: dict) -> str:
    from latent_cache.encoders import weights_digest

    model = StageC.from_flavor("tiny")
    model.load_state_dict(state)
    return weights_digest(model)


def test_a_worker_failure_is_recovered_from_the_latest_checkpoint(tiny_cache, mlflow_server, tmp_path):
    cfg = train_config(tiny_cache, str(tmp_path / "runs"), mlflow_server, "faulty", max_failures=1,
                       **{"fault.fail_at_step": 5, "fault.rank": 1, "fault.marker": str(tmp_path / "failed-once")})
    result, run_id = run_training(cfg)
    assert (tmp_path / "failed-once").exists()
    assert result.metrics["step"] == 6
    steps = [s for s, _ in metric_history(mlflow_server, run_id, "loss")]
    # Steps after the last checkpoint (3) ran before the failure and again after the restart from
    # it, but each is logged once: nothing repeats and nothing is missing.
    assert steps == [1, 2, 3, 4, 5, 6]
    runs = MlflowClient(mlflow_server).search_runs(
        [MlflowClient(mlflow_server).get_experiment_by_name("tests").experiment_id],
        filter_string="tags.`wuerstchen.run_name` = 'faulty'",
    )
    assert len(runs) == 1


def test_a_cache_of_other_encoders_is_refused_before_any_worker_starts(tiny_cache, mlflow_server, tmp_path):
    cfg = train_config(tiny_cache, str(tmp_path / "runs"), mlflow_server, "mismatch", **{"encoders.text_encoder.seed": 3})
    with pytest.raises(CacheMismatchError, match="text_encoder of fingerprint"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()


def test_model_init_from_a_registered_mlflow_model(mlflow_server, tmp_path):
    import mlflow
    import mlflow.pyfunc

    from pipelines.train import initial_weights

    class Holder(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    prior = StageC.from_flavor("tiny")
    prior.save_pretrained(tmp_path / "prior")
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("init-test")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="stage_c", python_model=Holder(), artifacts={"prior": str(tmp_path / "prior")},
                                       registered_model_name="init-test-stage-c")
    MlflowClient(mlflow_server).set_registered_model_alias("init-test-stage-c", "champion", info.registered_model_version)
    cfg = train_config("unused", str(tmp_path), mlflow_server, "x", **{"model.init": "models:/init-test-stage-c@champion"})
    state = initial_weights(cfg)
    assert all(torch.equal(state[k], v) for k, v in prior.state_dict().items())


def test_tokens_mode_runs_the_frozen_text_encoder_inside_the_step(ray_cluster, mlflow_server, tmp_path):
    source = plain_shards(tmp_path / "src", shards=1, per_shard=14, seed0=900)
    prep = load(PrepConfig, None, [
        f"source.url={source}", "source.format=webdataset", f"output.url={tmp_path / 'cache'}", "encode.flavor=tiny",
        "encode.resolution=128", "encode.batch_size=16", "encode.text_mode=tokens",
    ])
    run_prep(prep)
    cfg = train_config(str(tmp_path / "cache"), str(tmp_path / "runs"), mlflow_server, "tokens", steps=2, **{
        "parallel.num_workers": 1, "checkpoint.every_steps": 2, "validation.every_steps": 2, "data.batch_size": 4})
    result, _ = run_training(cfg)
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["val_loss_ema"]) and np.isfinite(result.metrics["loss"])


def test_fsdp2_sharded_checkpoints_resume_with_the_saved_weights(tiny_cache, mlflow_server, tmp_path):
    import torch.distributed.checkpoint as dcp

    storage = str(tmp_path / "runs")
    sets = {"parallel.strategy": "fsdp2", "checkpoint.fsdp_state_dict": "sharded"}
    _, run_id = run_training(train_config(tiny_cache, storage, mlflow_server, "sharded", steps=3, **sets))
    folder = tmp_path / "runs" / "sharded" / "checkpoint_00000003"
    assert sorted(p.name for p in (folder / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (folder / "model").exists() and (folder / "ema" / "config.json").is_file()
    # The shards hold the full model: read them back in this (non-distributed) process.
    state = {"model": StageC.from_flavor("tiny").state_dict()}
    dcp.load(state, checkpoint_id=str(folder / "sharded"))
    result, again = run_training(train_config(tiny_cache, storage, mlflow_server, "sharded", steps=6, **sets))
    assert again == run_id and result.metrics["step"] == 6
    assert [s for s, _ in metric_history(mlflow_server, run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert tags["resume.step_3.weights_sha256"] == weights_digest_of(state["model"])


def test_a_rerun_resumes_from_the_previous_checkpoint_when_the_newest_is_cut_short(tiny_cache, mlflow_server, tmp_path):
    """Ray's own record of the run names checkpoint 6; a file of it is cut short (an upload killed
    half-way, a full disk): the rerun must resume from checkpoint 3, not load half a file."""
    storage = str(tmp_path / "runs")
    _, run_id = run_training(train_config(tiny_cache, storage, mlflow_server, "cut-short", steps=6))
    newest = tmp_path / "runs" / "cut-short" / "checkpoint_00000006" / "model" / "diffusion_pytorch_model.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size - 100)
    saved = ckpt_io.read(tmp_path / "runs" / "cut-short" / "checkpoint_00000003")

    result, again = run_training(train_config(tiny_cache, storage, mlflow_server, "cut-short", steps=9))
    assert again == run_id and result.metrics["step"] == 9
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert tags["resume.step_3.weights_sha256"] == weights_digest_of(saved["model"])
    assert "resume.step_6.weights_sha256" not in tags


def test_a_run_name_with_another_config_or_storage_is_refused_not_continued(tiny_cache, mlflow_server, tmp_path):
    """A run name is one MLflow run and one checkpoint folder: rerunning it with another learning
    rate (or another storage path) must not continue the old MLflow run nor its checkpoints."""
    from core.config import ConfigError

    storage = str(tmp_path / "runs")
    _, run_id = run_training(train_config(tiny_cache, storage, mlflow_server, "one-config", steps=3))
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.002.*new checkpoint\.run_name"):
        run_training(train_config(tiny_cache, storage, mlflow_server, "one-config", steps=6, **{"optim.lr": 2e-3}))
    with pytest.raises(ConfigError, match=rf"MLflow run {run_id} .*checkpoint\.storage_path: {storage} -> {tmp_path}/elsewhere"):
        run_training(train_config(tiny_cache, str(tmp_path / "elsewhere"), mlflow_server, "one-config", steps=6))
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              filter_string="tags.`wuerstchen.run_name` = 'one-config'")
    assert [r.info.run_id for r in runs] == [run_id]
    assert [s for s, _ in metric_history(mlflow_server, run_id, "loss")] == [1, 2, 3], "nothing trained on"
    assert sorted(p.name for p in (tmp_path / "runs" / "one-config").glob("checkpoint_0*")) == ["checkpoint_00000003"]
