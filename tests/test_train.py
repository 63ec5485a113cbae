"""Stage C training on Ray Train with 2 CPU workers, against real parts: a local Ray cluster, moto's
S3 server for checkpoints, an MLflow server over HTTP."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import make_bucket
from mlflow.tracking import MlflowClient

from core.storage import resolve
from latent_cache.manifest import CacheMismatchError
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
        "validation.retrieval_captions": 4,  # sampled at every validation: a few, for the suite's time
    }
    base.update(sets)
    return load(TrainConfig, None, [f"{k}={v}" for k, v in base.items()])


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def weights_digest_of(state: dict) -> str:
    from latent_cache.encoders import weights_digest

    model = StageC.from_flavor("tiny")
    model.load_state_dict(state)
    return weights_digest(model)


# Each Ray Train run costs about a minute of a 2-core machine, so each test below follows one run
# through its life: trained, checked, resumed (and, for DDP, resumed past a cut-short checkpoint).
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_workers_train_checkpoint_to_s3_track_in_mlflow_and_resume(tiny_cache, mlflow_server, strategy):
    """DDP with full checkpoints and FSDP2 with sharded ones (torch.distributed.checkpoint, one file a
    rank), both on S3: 6 steps, then the same run name continued to 9 steps."""
    import torch.distributed.checkpoint as dcp

    bucket = make_bucket(f"train-{strategy}")
    storage = f"s3://{bucket}/runs"
    # FSDP2 also streams its data (Ray Data every epoch, the held-out rows through Ray too), where DDP
    # holds this small cache in memory and reads the held-out rows from its files: both ways run.
    sets = {"parallel.strategy": strategy} | ({"checkpoint.fsdp_state_dict": "sharded", "data.memory_limit_mb": 0}
                                              if strategy == "fsdp2" else {})
    cfg = train_config(tiny_cache, storage, mlflow_server, f"run-{strategy}", **sets)
    result, run_id = run_training(cfg)
    assert result.metrics["step"] == 6
    steps = [s for s, _ in metric_history(mlflow_server, run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    for key in ("val_loss_ema", "val_loss_raw"):  # the EMA weights (registered) and the trained ones
        val = metric_history(mlflow_server, run_id, key)
        assert [s for s, _ in val] == [3, 6] and all(np.isfinite(v) for _, v in val), key
    for key in ("val_retrieval_median_rank_ema", "val_train_retrieval_top10_ema"):  # does it follow its captions
        val = metric_history(mlflow_server, run_id, key)
        assert [s for s, _ in val] == [3, 6] and all(np.isfinite(v) and v >= 0 for _, v in val), key
    for key in ("lr", "grad_norm", "samples_per_s", "data_wait_fraction"):
        assert len(metric_history(mlflow_server, run_id, key)) == 6, key
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["parallel.strategy"] == strategy
    artifacts = [a.path for a in MlflowClient(mlflow_server).list_artifacts(run_id)]
    assert "cache_manifest.json" in artifacts

    latest = ckpt_io.latest(cfg.checkpoint)
    assert latest is not None and latest.path.endswith("checkpoint_00000006")
    fs, root = resolve(storage)
    with latest.as_directory() as folder:
        ema = StageC.from_pretrained(f"{folder}/ema")
        if strategy == "fsdp2":
            names = sorted(p.name for p in Path(folder, "sharded").glob("*.distcp"))
            assert names == ["__0_0.distcp", "__1_0.distcp"] and not Path(folder, "model").exists()
            # The shards hold the full model: read them back in this (non-distributed) process.
            state = {"model": StageC.from_flavor("tiny").state_dict()}
            dcp.load(state, checkpoint_id=f"{folder}/sharded")
            state["train_state"] = ckpt_io.train_state_of(latest)
        else:
            state = ckpt_io.read(folder)
    assert state["train_state"]["step"] == 6 and state["train_state"]["mlflow_run_id"] == run_id
    assert ema.config == StageC.flavor_config("tiny")
    # EMA (decay 0.9 over 6 steps) lies between the start and the trained weights: not equal to either
    assert any(not torch.equal(ema.state_dict()[k], state["model"][k]) for k in state["model"])

    resumed_from = 6
    if strategy == "ddp":
        # A file of the newest checkpoint is cut short (an upload killed half-way, a full disk) while
        # Ray's own record names it: the rerun must resume from checkpoint 3, not load half a file.
        newest = f"{root}/run-{strategy}/checkpoint_00000006/model/diffusion_pytorch_model.safetensors"
        with fs.open_input_stream(newest) as f:
            data = f.read()
        with fs.open_output_stream(newest) as f:
            f.write(data[:-100])
        with ckpt_io.latest(cfg.checkpoint).as_directory() as folder:
            state = ckpt_io.read(folder)
        resumed_from = 3

    result, again = run_training(train_config(tiny_cache, storage, mlflow_server, f"run-{strategy}", steps=9, **sets))
    assert again == run_id and result.metrics["step"] == 9, "a resumed run continues its MLflow run"
    assert [s for s, _ in metric_history(mlflow_server, run_id, "loss")] == list(range(1, 10)), "no step twice"
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert tags[f"resume.step_{resumed_from}.weights_sha256"] == weights_digest_of(state["model"])
    assert [k for k in tags if k.startswith("resume.step_")] == [f"resume.step_{resumed_from}.weights_sha256"]

    # A run name is one MLflow run and one checkpoint folder: rerunning it with another learning rate
    # (or another storage path) must not continue the old MLflow run nor its checkpoints.
    from core.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.002.*new checkpoint\.run_name"):
        run_training(train_config(tiny_cache, storage, mlflow_server, f"run-{strategy}", steps=12, **sets, **{"optim.lr": 2e-3}))
    elsewhere = f"s3://{bucket}/elsewhere"
    with pytest.raises(ConfigError, match=rf"MLflow run {run_id} .*checkpoint\.storage_path: {storage} -> {elsewhere}"):
        run_training(train_config(tiny_cache, elsewhere, mlflow_server, f"run-{strategy}", steps=12, **sets))
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                              filter_string=f"tags.`wuerstchen.run_name` = 'run-{strategy}'")
    assert [r.info.run_id for r in runs] == [run_id]
    assert [s for s, _ in metric_history(mlflow_server, run_id, "loss")] == list(range(1, 10)), "nothing trained on"
    assert ckpt_io.latest(cfg.checkpoint).path.endswith("checkpoint_00000009")


def test_a_cache_of_other_encoders_is_refused_before_any_worker_starts(tiny_cache, mlflow_server, tmp_path):
    cfg = train_config(tiny_cache, str(tmp_path / "runs"), mlflow_server, "mismatch", **{"encoders.text_encoder.seed": 3})
    with pytest.raises(CacheMismatchError, match="text_encoder of fingerprint"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_run_its_devices_cannot_hold_is_refused_before_any_worker_starts_with_its_memory_plan(tiny_cache, mlflow_server,
                                                                                                  tmp_path):
    cfg = train_config(tiny_cache, str(tmp_path / "runs"), mlflow_server, "too-big", **{"parallel.gpu_memory_gib": 0.001})
    with pytest.raises(ValueError, match=r"(?s)does not fit its devices' memory:.*memory plan: Stage C tiny, ddp on 2 GPU"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tests")
    assert not experiment or client.search_runs([experiment.experiment_id], "tags.`wuerstchen.run_name` = 'too-big'") == []


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
    # Not mlflow.set_experiment: it would stay this process's active experiment, and a later test's
    # mlflow.start_run(run_id=...) of a run in another experiment would be refused.
    experiment_id = MlflowClient(mlflow_server).create_experiment("init-test")
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(name="stage_c", python_model=Holder(), artifacts={"prior": str(tmp_path / "prior")},
                                       registered_model_name="init-test-stage-c")
    MlflowClient(mlflow_server).set_registered_model_alias("init-test-stage-c", "champion", info.registered_model_version)
    cfg = train_config("unused", str(tmp_path), mlflow_server, "x", **{"model.init": "models:/init-test-stage-c@champion"})
    state = initial_weights(cfg)
    assert all(torch.equal(state[k], v) for k, v in prior.state_dict().items())


def test_tokens_mode_runs_the_frozen_text_encoder_inside_the_step(decoder_cache, mlflow_server, tmp_path):
    from latent_cache.reader import Cache

    assert Cache(decoder_cache).manifest["text_mode"] == "tokens"
    cfg = train_config(decoder_cache, str(tmp_path / "runs"), mlflow_server, "tokens", steps=2, **{
        "parallel.num_workers": 1, "checkpoint.every_steps": 2, "validation.every_steps": 2, "data.batch_size": 4})
    result, _ = run_training(cfg)
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["val_loss_ema"]) and np.isfinite(result.metrics["loss"])


@pytest.mark.parametrize("mixed", [False, True])
def test_the_rows_a_worker_reads_in_process_are_those_ray_data_gives(tiny_cache, mixed):
    """A worker reads a small cache with pyarrow (rows.worker_rows): its held-out rows are Ray Data's
    validation dataset, in the same batches; the ranks' training shares are disjoint, of sizes one
    row apart at most, and together Ray Data's training dataset, with its columns, dtypes, shapes and
    values (with data.shards, its mix of new shards and replay)."""
    from latent_cache.reader import Cache, numpy_batches
    from pipelines.training.rows import datasets, worker_rows

    cache = Cache(tiny_cache)
    columns = ["key", "caption", "stage_c_latents", *cache.text_columns]
    mix = (sorted(cache.manifest["shards"])[:1], 0.5) if mixed else (None, 1.0)
    train, val = datasets(cache, columns, 0.2, *mix)
    by_ray = list(val.iter_batches(batch_size=4, batch_format="numpy"))
    shares = [worker_rows(cache, columns, 0.2, rank, 2, *mix) for rank in (0, 1)]
    assert shares[0][1].equals(shares[1][1])  # every rank holds all the held-out rows
    in_process = numpy_batches(shares[0][1], 4)
    assert [len(b["key"]) for b in in_process[:-1]] == [4] * (len(in_process) - 1) and 0 < len(in_process[-1]["key"]) <= 4
    assert set(in_process[0]) == set(by_ray[0]) == set(columns)
    assert [list(b["key"]) for b in in_process] == [list(b["key"]) for b in by_ray]

    def rows(batches):
        return {str(k): {c: b[c][i] for c in columns} for b in batches for i, k in enumerate(b["key"])}

    def same(ours, theirs):
        assert sorted(ours) == sorted(theirs) and len(ours) >= 4
        for key, row in ours.items():
            for c in columns:
                a, b = np.asarray(row[c]), np.asarray(theirs[key][c])
                assert a.dtype == b.dtype and a.shape == b.shape and (a == b).all(), (key, c)

    same(rows(in_process), rows(by_ray))
    keys = [set(share.column("key").to_pylist()) for share, _ in shares]
    assert not keys[0] & keys[1] and abs(len(keys[0]) - len(keys[1])) <= 1
    same(rows(numpy_batches(pa.concat_tables([share for share, _ in shares]), 4)),
         rows(train.iter_batches(batch_size=4, batch_format="numpy")))
    shard_of = dict(zip(*cache.read_table(["key", "source_shard"]).to_pydict().values()))
    assert {shard_of[k] for k in keys[0]} == {shard_of[k] for k in keys[1]} == set(cache.manifest["shards"])
