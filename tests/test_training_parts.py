"""Training pieces on their own: equal steps per rank with uneven shards, EMA schedules, the
metric logger across an MLflow outage."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, randomize_, wait_for_port

from pipelines.training.config import CheckpointConfig, EmaConfig
from latent_cache.reader import is_validation
from pipelines.training.data import EqualStepBatches
from pipelines.training.ema import Ema
from pipelines.training.tracking import MetricLogger


class FakeShard:
    """A dataset shard with a fixed number of batches per epoch (what uneven Ray blocks give)."""

    def __init__(self, batches: int, rank: int):
        self.batches, self.rank, self.epochs = batches, rank, 0

    def iter_batches(self, batch_size, batch_format, drop_last):
        self.epochs += 1
        for i in range(self.batches):
            yield {"key": np.array([f"r{self.rank}e{self.epochs}b{i}"] * batch_size, dtype=object),
                   "stage_c_latents": np.zeros((batch_size, 16, 2, 2), np.float32)}


def _worker(rank: int, port: int, per_rank_batches: list[int], steps: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    batches = EqualStepBatches(FakeShard(per_rank_batches[rank], rank), 2, torch.device("cpu"))
    keys = []
    for _ in range(steps):
        keys.append(batches.next()["key"][0])
        dist.all_reduce(torch.ones(1))  # what the gradient sync does every step
    Path(out, f"rank{rank}.txt").write_text("\n".join(keys))
    dist.destroy_process_group()


@pytest.mark.integration  # two spawned processes running the training code over gloo
def test_every_rank_takes_the_same_number_of_steps_on_uneven_shards(tmp_path):
    """Rank 0 has 5 batches per epoch, rank 1 only 3: both run 10 steps and start each epoch together."""
    mp.start_processes(_worker, args=(free_port(), [5, 3], 10, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    rank0 = (tmp_path / "rank0.txt").read_text().split()
    rank1 = (tmp_path / "rank1.txt").read_text().split()
    assert len(rank0) == len(rank1) == 10
    # epochs advance together: at most 3 batches each per epoch, both ranks in the same epoch at each step
    assert [k.split("b")[0][2:] for k in rank0] == [k.split("b")[0][2:] for k in rank1]
    assert rank0[:4] == ["r0e1b0", "r0e1b1", "r0e1b2", "r0e2b0"]


def test_a_shard_smaller_than_a_batch_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="fewer than batch_size=2 rows"):
        EqualStepBatches(FakeShard(0, 0), 2, torch.device("cpu")).next()


class CountingShard:
    """A shard of 10 fixed rows that counts how often it is read."""

    def __init__(self):
        self.reads = 0

    def iter_batches(self, batch_size, batch_format, drop_last):
        self.reads += 1
        keys = [f"k{i}" for i in range(10)]
        for start in range(0, 10, batch_size):
            part = keys[start:start + batch_size]
            if drop_last and len(part) < batch_size:
                return
            yield {"key": np.array(part, dtype=object), "stage_c_latents": np.arange(start, start + len(part), dtype=np.float32)}


def test_a_shard_held_in_memory_is_read_once_and_every_epoch_is_a_new_seeded_order():
    """in_memory: one read for the whole run (no re-read at epoch boundaries); each epoch a permutation
    of those rows drawn from (seed, epoch, rank), whole batches only; resuming mid-epoch gives the same
    batches again; without a shuffle buffer, the order read."""
    shard = CountingShard()
    batches = EqualStepBatches(shard, 3, torch.device("cpu"), shuffle_buffer=64, seed=7, in_memory=True)
    steps = [batches.next() for _ in range(9)]
    assert shard.reads == 1 and batches.state_dict() == {"epoch": 2, "batch_in_epoch": 3}
    epochs = [sum((s["key"] for s in steps[e * 3:(e + 1) * 3]), []) for e in range(3)]
    assert all(len(set(e)) == 9 and set(e) < {f"k{i}" for i in range(10)} for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3, "a new order every epoch"
    for step in steps:  # the rows' values travel with their keys
        assert step["stage_c_latents"].tolist() == [float(k[1:]) for k in step["key"]]
    resumed = EqualStepBatches(CountingShard(), 3, torch.device("cpu"), shuffle_buffer=64, seed=7, in_memory=True)
    resumed.load_state_dict({"epoch": 1, "batch_in_epoch": 1})
    assert [resumed.next()["key"] for _ in range(5)] == [s["key"] for s in steps[4:9]]
    other_seed = EqualStepBatches(CountingShard(), 3, torch.device("cpu"), shuffle_buffer=64, seed=8, in_memory=True)
    assert [other_seed.next()["key"] for _ in range(3)] != [s["key"] for s in steps[:3]]
    plain = EqualStepBatches(CountingShard(), 3, torch.device("cpu"), in_memory=True)
    assert [plain.next()["key"] for _ in range(4)] == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6", "k7", "k8"], ["k0", "k1", "k2"]]
    # Rows read by the worker itself (read=: a cache read in process) take the same way from there.
    reads = []

    def read():
        reads.append(1)
        return {"key": np.array([f"k{i}" for i in range(10)], dtype=object), "stage_c_latents": np.arange(10, dtype=np.float32)}

    own = EqualStepBatches(None, 3, torch.device("cpu"), shuffle_buffer=64, seed=7, read=read)
    assert [own.next()["key"] for _ in range(9)] == [s["key"] for s in steps] and len(reads) == 1


def test_the_validation_split_depends_on_the_key_only():
    keys = [f"img{i}" for i in range(20_000)]
    held_out = [k for k in keys if is_validation(k, 0.05)]
    assert abs(len(held_out) / len(keys) - 0.05) < 0.01
    assert held_out == [k for k in reversed(keys) if is_validation(k, 0.05)][::-1]


def test_the_workers_read_a_small_cache_in_process():
    """Within data.memory_limit_mb for the whole cache's columns read (every bucket's rows times its
    row size), pyarrow in each worker (its training share and the held-out rows); above it, Ray Data."""
    from types import SimpleNamespace

    from pipelines.train import reads_in_process

    shapes = {"stage_c_latents": [16, 24, 24], "text_embeddings": [77, 1280]}  # 36 KiB + 385 KiB a row in fp32
    cache = SimpleNamespace(manifest={"shapes": shapes}, buckets={"24x24": {"shapes": shapes, "rows": 2000}})
    columns = ["key", "caption", "stage_c_latents", "text_embeddings"]
    row = 4 * (16 * 24 * 24 + 77 * 1280 + 2)
    cfg = SimpleNamespace(data=SimpleNamespace(memory_limit_mb=2000 * row // 2**20 + 1))
    assert reads_in_process(cfg, cache, columns)
    cfg.data.memory_limit_mb -= 2
    assert not reads_in_process(cfg, cache, columns)
    cfg.data.memory_limit_mb = 0  # streaming asked for: Ray Data throughout
    assert not reads_in_process(cfg, cache, columns)


def test_ema_schedules():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    every = Ema(model, EmaConfig(mode="every_step", decay=0.9))
    original = Ema(model, EmaConfig(mode="original", every=2, beta=0.5, copy_until=4))
    for step in range(1, 9):
        with torch.no_grad():
            model.weight.fill_(float(step))
        every.update(model, step)
        original.update(model, step)
        if step == 1:
            assert every.shadow["weight"][0, 0].item() == pytest.approx(0.1)
            assert original.shadow["weight"][0, 0].item() == 0.0  # not an update step
        if step == 4:
            assert original.shadow["weight"][0, 0].item() == 4.0  # a plain copy until copy_until
    assert original.shadow["weight"][0, 0].item() == pytest.approx(0.5 * (0.5 * 4 + 0.5 * 6) + 0.5 * 8)
    assert Ema(model, EmaConfig(mode="none")).shadow == {}


def _start_mlflow(root: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    wait_for_port(port, timeout=120, process=process)
    return process


@pytest.mark.integration  # its own MLflow server, stopped and started again
def test_metrics_survive_a_tracking_server_outage(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow(tmp_path, port)
    try:
        run_id = MlflowClient(uri).create_run(MlflowClient(uri).create_experiment("outage")).info.run_id
        logger = MetricLogger(uri, run_id)
        logger.log({"loss": 1.0}, step=1)
    finally:
        server.terminate()
        server.wait(timeout=20)
    start = time.monotonic()
    for step in (2, 3, 4):
        logger.log({"loss": float(step)}, step=step)  # the server is gone: kept, warned, no exception
    assert time.monotonic() - start < 30, "logging must not stall training while the server is away"
    assert len(logger.pending) == 3 and "MLflow is unreachable" in caplog.text
    server = _start_mlflow(tmp_path, port)
    try:
        logger.log({"loss": 5.0}, step=5)
        assert logger.pending == []
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    finally:
        server.terminate()
        server.wait(timeout=20)


def _write_checkpoint(root: Path, step: int, model: torch.nn.Module) -> Path:
    from pipelines.training import checkpoint as ckpt_io

    folder = root / ckpt_io.checkpoint_name(step)
    folder.mkdir(parents=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return ckpt_io.write(folder, model.config, state, state, {"state": {}, "param_groups": []},
                         {"step": step, "data_position": {"epoch": 0, "batch_in_epoch": step}})


def test_a_truncated_file_of_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    """Ray uploads a checkpoint file by file: a killed upload leaves every file in place but one
    cut short. Resuming must not take it for complete."""
    from pipelines.training import checkpoint as ckpt_io
    from stages import StageC

    model = StageC.from_flavor("tiny")
    _write_checkpoint(tmp_path / "run", 3, model)
    newest = _write_checkpoint(tmp_path / "run", 6, model)
    weights = newest / "ema" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)

    with pytest.raises(ckpt_io.IncompleteCheckpointError, match=r"ema/diffusion_pytorch_model.safetensors"):
        ckpt_io.read_train_state(newest)
    found = ckpt_io.latest(CheckpointConfig(storage_path=str(tmp_path), run_name="run"))
    assert found is not None and Path(found.path).name == "checkpoint_00000003"
    assert "checkpoint_00000006 is incomplete" in caplog.text and "ema/diffusion_pytorch_model.safetensors" in caplog.text
    assert ckpt_io.read(Path(found.path))["train_state"]["step"] == 3


def test_the_original_ema_schedule_takes_the_last_step_even_off_its_grid():
    """steps % every != 0: the weights of the last steps must still reach the EMA that is registered."""
    model = torch.nn.Linear(2, 1, bias=False)
    original = Ema(model, EmaConfig(mode="original", every=4, beta=0.5, copy_until=4))
    for step in range(1, 7):
        with torch.no_grad():
            model.weight.fill_(float(step))
        original.update(model, step, last=step == 6)
    assert original.shadow["weight"][0, 0].item() == pytest.approx(0.5 * 4 + 0.5 * 6)


def test_an_original_ema_schedule_that_never_averages_is_refused():
    """A fine-tune of 2,000 steps with the pre-training's copy_until=5,000 only ever copies the
    weights: its "EMA" is the raw weights. Refused when the config is read, before any work."""
    from core.config import ConfigError, load
    from pipelines.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"ema.copy_until=5000 .* steps=2000"):
        load(TrainConfig, None, ["ema.mode=original", "ema.copy_until=5000", "steps=2000"])
    assert load(TrainConfig, None, ["ema.mode=original", "ema.copy_until=1999", "steps=2000"]).ema.copy_until == 1999
    assert load(TrainConfig, None, ["ema.mode=every_step", "ema.copy_until=5000", "steps=2000"]).steps == 2000


def test_the_shipped_configs_average_their_ema():
    from core.config import load
    from pipelines.retrain import RetrainConfig
    from pipelines.training.config import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("train_*.yaml")):
        load(TrainConfig, path)
    for path in sorted(root.glob("retrain_*.yaml")):
        load(RetrainConfig, path)


def _stage_c_task(text_mode: str = "embeddings", **sets):
    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.tasks import StageCTask

    cfg = load(TrainConfig, None, ["model.flavor=tiny", *sets.get("sets", [])])
    empty = np.zeros((4, 32), dtype=np.float32)
    return StageCTask(cfg.model, cfg.encoders, cfg.objective, cfg.validation, text_mode, empty).setup(torch.device("cpu"))


def _held_out(batches: int, rows: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"key": np.array([f"k{seed}-{i}-{j}" for j in range(rows)], dtype=object),
             "stage_c_latents": rng.standard_normal((rows, 16, 3, 3)).astype(np.float32),
             "text_embeddings": rng.standard_normal((rows, 4, 32)).astype(np.float32)} for i in range(batches)]


def test_validation_measures_the_ema_weights_and_gives_the_trained_ones_back():
    """What gets registered is the EMA: its loss is measured on the EMA weights, beside the trained
    weights' loss under its own name, and the model trains on with its own weights afterwards."""
    from pipelines.training.loop import validate
    from stages import StageC

    model = StageC.from_flavor("tiny")
    ema = Ema(model, EmaConfig(mode="every_step", decay=0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # the trained weights move away from the EMA
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = {k: v.clone() for k, v in ema.shadow.items()}
    batches = _held_out(2, 2)
    task = _stage_c_task(sets=["validation.retrieval_captions=0"])  # the losses alone (retrieval: its own test)

    out = validate(model, ema, batches, task)
    assert set(out) == {"val_loss_raw", "val_loss_ema", "val_condition_gap_raw", "val_condition_gap_ema"}
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items()), "the trained weights come back"
    assert all(torch.equal(v, shadow[k]) for k, v in ema.shadow.items()), "the EMA is left as it was"
    assert out["val_loss_raw"] == task.validation_loss(model, batches)["loss"]
    on_ema = StageC.from_flavor("tiny")
    on_ema.load_state_dict({**trained, **shadow})
    assert out["val_loss_ema"] == task.validation_loss(on_ema, batches)["loss"]
    assert out["val_loss_ema"] != out["val_loss_raw"]
    assert validate(model, Ema(model, EmaConfig(mode="none")), batches, task).keys() == {"val_loss_raw", "val_condition_gap_raw"}


def test_the_validation_loss_does_not_depend_on_the_batching_or_the_split_across_workers():
    """Noise fixed per (key, t): the same rows give the same number in one batch, in batches of one,
    in another order, or split across two workers (each averaging its share, weighted by rows)."""
    from pipelines.training.tasks import validation_inputs
    from stages import StageC
    from stages.objectives import stage_c_validation_loss

    model = StageC.from_flavor("tiny").train()
    rows = _held_out(1, 6)[0]

    def loss(batches: list[dict], seed: int = 0) -> float:
        return stage_c_validation_loss(model, validation_inputs(batches, torch.device("cpu"), None), (0.2, 0.8), seed)

    def part(index) -> dict:
        return {k: v[index] for k, v in rows.items()}

    whole = loss([rows])
    assert model.training, "the model is given back in training mode"
    assert loss([part([i]) for i in range(6)]) == pytest.approx(whole, rel=1e-6)
    assert loss([part([5, 3, 1]), part([0, 2, 4])]) == pytest.approx(whole, rel=1e-6)
    workers = [loss([part([0, 1])]) * 2, loss([part([2, 3, 4, 5])]) * 4]
    assert sum(workers) / 6 == pytest.approx(whole, rel=1e-6)
    assert loss([rows], seed=1) != pytest.approx(whole, rel=1e-6), "the seed picks the noise"


def test_the_stage_c_task_reads_its_columns_and_drops_captions_to_the_empty_prompt():
    from stages import StageC

    assert _stage_c_task().columns == ["key", "stage_c_latents", "text_embeddings"]
    assert _stage_c_task("tokens").columns == ["key", "stage_c_latents", "text_tokens", "text_mask"]
    model = randomize_(StageC.from_flavor("tiny")).eval()  # no gate hides the text, no dropout mask differs
    batch = {k: torch.as_tensor(v) for k, v in _held_out(1, 3)[0].items() if k != "key"}
    # every caption dropped: the loss is that of the empty prompt's encoding, given to every row
    task = _stage_c_task(sets=["objective.caption_dropout=1.0"])
    dropped = {**batch, "text_embeddings": torch.zeros(3, 4, 32)}
    kept = _stage_c_task(sets=["objective.caption_dropout=0.0"])
    loss = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss == kept.loss(model, dropped, torch.Generator().manual_seed(0))
    assert loss != kept.loss(model, batch, torch.Generator().manual_seed(0))


def test_the_train_state_round_trips_through_its_state_dict():
    """Model, EMA, optimizer, lr schedule, step and data position come back from a state_dict into a
    freshly built state, so the next step is the one the saved state would have taken."""
    import copy

    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.state import TrainState

    cfg = load(TrainConfig, None, ["model.flavor=tiny", "optim.warmup_steps=10", "ema.decay=0.5"])
    batches = [{k: torch.as_tensor(v) for k, v in b.items() if k != "key"} for b in _held_out(4, 2)]
    task = _stage_c_task()

    class Position:
        """Stands for EqualStepBatches: its data position."""
        def __init__(self):
            self.position = {"epoch": 0, "batch_in_epoch": 0}

        def state_dict(self):
            return dict(self.position)

        def load_state_dict(self, position):
            self.position = dict(position)

    def build() -> TrainState:
        torch.manual_seed(0)
        return TrainState.build(cfg.model.build(), Position(), cfg, torch.device("cpu"))

    def step(state: TrainState, batch: dict) -> float:
        state.seed_step(rank=0)
        state.optimizer.zero_grad()
        loss = task.loss(state.model, batch, state.generator)
        loss.backward()
        loss = loss.item()
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        state.ema.update(state.model, state.step)
        state.batches.position = {"epoch": 1, "batch_in_epoch": state.step}
        return loss

    saved = build()
    for batch in batches[:2]:
        step(saved, batch)
    snapshot = copy.deepcopy(saved.state_dict())  # as written to disk: not the live tensors (a CPU .cpu() is no copy)
    assert snapshot["step"] == 2 and snapshot["data_position"] == {"epoch": 1, "batch_in_epoch": 2}
    restored = build()
    restored.load_state_dict(snapshot)
    assert restored.step == 2 and restored.batches.state_dict() == snapshot["data_position"]
    assert restored.scheduler.get_last_lr() == saved.scheduler.get_last_lr()
    for k, v in restored.state_dict().items():
        if isinstance(v, dict) and k in ("model", "ema"):
            assert all(torch.equal(v[name], snapshot[k][name]) for name in v), k
    assert step(restored, batches[2]) == step(saved, batches[2])
    assert all(torch.equal(a, b) for a, b in zip(restored.model.parameters(), saved.model.parameters()))
    assert all(torch.equal(restored.ema.shadow[n], saved.ema.shadow[n]) for n in saved.ema.shadow)


def _fsdp2_restore_worker(rank: int, port: int, out: str) -> None:
    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.state import TrainState

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load(TrainConfig, None, ["model.flavor=tiny", "parallel.strategy=fsdp2", "ema.decay=0.5"])
    saved = randomize_(cfg.model.build(), seed=1).state_dict()  # what a full checkpoint holds
    ema = randomize_(cfg.model.build(), seed=2).state_dict()
    torch.manual_seed(0)
    state = TrainState.build(cfg.model.build(), EqualStepBatches(FakeShard(1, rank), 2, torch.device("cpu")), cfg,
                             torch.device("cpu"))
    state.load_state_dict({"model": saved, "ema": ema, "optimizer": None, "step": 3,
                           "data_position": {"epoch": 1, "batch_in_epoch": 2}})
    back = state.state_dict()  # gathered from the shards again
    same = all(torch.equal(back["model"][k], saved[k]) for k in saved)
    same_ema = all(torch.equal(back["ema"][k], ema[k]) for k in state.ema.shadow)
    sharded = any(p.to_local().numel() < p.numel() for p in state.model.parameters())  # it really is sharded
    Path(out, f"rank{rank}.txt").write_text(f"{same} {same_ema} {sharded} {back['step']}")
    dist.destroy_process_group()


def test_a_full_checkpoint_loads_into_an_fsdp2_sharded_model():
    """A full (gathered) checkpoint is loaded after fully_shard: each rank keeps its shard of the
    saved weights and of the EMA, and gathering them again gives the saved values."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_fsdp2_restore_worker, args=(free_port(), out), nprocs=2, start_method="spawn", join=True)
        results = [Path(out, f"rank{r}.txt").read_text() for r in range(2)]
    assert results == ["True True True 3"] * 2


def _retrieval_inputs():
    gen = torch.Generator().manual_seed(4)
    text, empty = torch.randn(5, 8, 32, generator=gen), torch.randn(1, 8, 32, generator=gen)
    return text, torch.randn(9, 16, 3, 3, generator=gen), empty  # 5 captions, their own latents among 9


def _retrieval(model, batch_size=64):
    from pipelines.quality import sampled_ranks

    text, candidates, empty = _retrieval_inputs()
    return sampled_ranks(model, text, [4, 3, 2, 1, 0], candidates, empty, steps=2, guidance=3.0, seed=5,
                         batch_size=batch_size)


def _validation_figures(model) -> dict[str, float]:
    """Stage C's validation loss and condition gap of 7 held-out rows in batches of 2 (the last of 1)."""
    from pipelines.training.tasks import condition_gap
    from stages.objectives import stage_c_validation_loss

    gen = torch.Generator().manual_seed(6)
    z_c, text = torch.randn(7, 16, 3, 3, generator=gen), torch.randn(7, 8, 32, generator=gen)
    rows = [([f"row{j}" for j in range(i, min(i + 2, 7))], z_c[i:i + 2], text[i:i + 2]) for i in range(0, 7, 2)]

    def loss(batches):
        return stage_c_validation_loss(model, batches, (0.2, 0.7), seed=3)

    return condition_gap(loss, rows, 2)  # spread over the ranks under a process group


def _spread_retrieval_worker(rank: int, world: int, port: int, out: str) -> None:
    from pipelines.training import parallel
    from pipelines.training.parallel import parallelize
    from stages import StageC

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = randomize_(StageC.from_flavor("tiny"), seed=1, std=0.1)
    # every unit gathers its parameters at each forward: a rank running fewer forwards would hang the rest
    model = parallelize(model, "fsdp2", torch.device("cpu"), reshard_after_forward=True)
    worked, spread = [], parallel.spread_over_ranks

    def recording(count, work):  # which captions this rank samples
        return spread(count, lambda indices: (worked.append(list(indices)), work(indices))[1])

    parallel.spread_over_ranks = recording
    ranks, sampled = _retrieval(model, batch_size=1)  # a forward per caption
    parallel.spread_over_ranks = spread
    figures = _validation_figures(model)
    torch.save({"ranks": ranks, "sampled": sampled, "worked": worked, "training": model.training, **figures},
               Path(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_validation_spread_over_the_ranks_gives_the_figures_of_one_process(tmp_path):
    """Three FSDP2 ranks share five retrieval captions (two, two and one, padded to two so that every
    rank runs the same forwards, one caption at a time): each samples only its own, and every rank
    ends with the same latents and ranks as one process sampling all five in one batch (each
    caption's noise is its own). So with the validation loss and condition gap of seven rows."""
    from stages import StageC

    mp.start_processes(_spread_retrieval_worker, args=(3, free_port(), str(tmp_path)), nprocs=3, start_method="spawn",
                       join=True)
    alone = randomize_(StageC.from_flavor("tiny"), seed=1, std=0.1)
    ranks, sampled = _retrieval(alone)
    assert alone.training  # given back in its mode
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert [r["worked"] for r in results] == [[[0, 3]], [[1, 4]], [[2, 2]]]
    figures = _validation_figures(alone)
    assert figures["condition_gap"] != 0
    for r in results:
        assert r["training"] and torch.equal(r["ranks"], ranks)
        # the rows split 3 / 3 / 1 over the ranks (in batches of 2: the last rank runs one batch again)
        assert r["loss"] == pytest.approx(figures["loss"], rel=1e-6)
        assert r["condition_gap"] == pytest.approx(figures["condition_gap"], rel=1e-4, abs=1e-7)
        assert (r["sampled"] - sampled).abs().max() <= 1e-5 * sampled.abs().max()
    assert sampled.abs().max() > 0 and len(set(sampled.flatten(1).sum(1).tolist())) == 5


def test_the_plan_travels_to_the_workers_as_it_is():
    import pickle

    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.plan import TrainPlan

    cfg = load(TrainConfig, None, ["model.flavor=tiny", "model.overrides={depth: 1}", "optim.betas=[0.8, 0.9]"])
    task = _stage_c_task()
    plan = TrainPlan(cfg, task, "http://mlflow", "run", {"text_encoder": "abc"})
    back = pickle.loads(pickle.dumps(plan))
    assert back.cfg == cfg and back.cfg.model.stage_c_config() == cfg.model.stage_c_config()
    assert back.cfg.model.stage_c_config().depth == 1 and back.cfg.optim.betas == (0.8, 0.9)
    assert back.mlflow_run_id == plan.mlflow_run_id and np.array_equal(back.task.empty_text, task.empty_text)


def test_the_plan_names_the_checkpoint_storage_as_the_driver_resolved_it(tmp_path, monkeypatch):
    """A relative storage path (configs/*.yaml: runs/train) means the driver's working directory: a
    worker, which runs in another one, looks for the checkpoint to resume from there (it once found
    none and started the run over); the run's config keeps what the user wrote."""
    import os
    import pickle

    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.plan import TrainPlan

    monkeypatch.chdir(tmp_path)
    cfg = load(TrainConfig, None, ["model.flavor=tiny", "checkpoint.storage_path=runs/train"])
    plan = pickle.loads(pickle.dumps(TrainPlan(cfg, _stage_c_task(), "http://mlflow", "run", {})))
    monkeypatch.chdir(os.path.dirname(tmp_path))  # the worker's working directory is elsewhere
    assert plan.checkpoints.storage_path == str(tmp_path / "runs" / "train") and plan.cfg.checkpoint.storage_path == "runs/train"
    assert plan.checkpoints.storage()[1] == str(tmp_path / "runs" / "train")
    s3 = load(TrainConfig, None, ["model.flavor=tiny", "checkpoint.storage_path=s3://bucket/runs"])
    assert TrainPlan(s3, _stage_c_task(), "http://mlflow", "run", {}).checkpoints.storage_path == "s3://bucket/runs"


def test_the_config_hash_covers_what_defines_a_run_and_not_what_may_change_on_resume():
    import dataclasses

    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.tracking import config_hash

    def digest(*sets: str) -> str:
        return config_hash(dataclasses.asdict(load(TrainConfig, None, list(sets))))

    base = digest()
    for resumable in ("steps=900", "max_failures=3", "tracking.log_every=1", "tracking.experiment=other",
                      "checkpoint.every_steps=7", "validation.every_steps=7", "ray_address=auto",
                      "parallel.cpus_per_worker=2", "model.activation_checkpointing=selective",
                      "model.compile=true", "parallel.reshard_after_forward=false", "fault.fail_at_step=3"):
        assert digest(resumable) == base, resumable
    for defining in ("optim.lr=0.5", "checkpoint.storage_path=s3://b/runs", "data.cache=other", "ema.decay=0.5",
                     "model.init=models:/m/1", "parallel.num_workers=4", "seed=1", "validation.t_grid=[0.5]",
                     "data.shards=[a]", "model.overrides={depth: 1}", "parallel.precision=bf16"):
        assert digest(defining) != base, defining
    # the same values read back from a checkpoint's train_state.json (tuples become lists)
    import json

    assert config_hash(json.loads(json.dumps(dataclasses.asdict(load(TrainConfig))))) == base


def test_stage_c_validation_retrieves_the_latents_of_the_captions_it_learned_and_not_of_misaligned_ones():
    """Eight captions, each with its own latent, learned by a tiny prior: the validation's retrieval
    finds each training caption's own latent (top1) among those and 24 held-out latents, while the
    same captions rolled against their latents (a misaligned cache) do not; held-out captions it
    never saw stay near chance. The loss alone would not tell these apart."""
    from pipelines.training.data import to_tensors

    rng = np.random.default_rng(7)
    probe = {"key": np.array([f"train-{i}" for i in range(8)], dtype=object),
             "stage_c_latents": rng.standard_normal((8, 16, 3, 3)).astype(np.float32),
             "text_embeddings": rng.standard_normal((8, 4, 32)).astype(np.float32)}
    held = _held_out(2, 12, seed=3)
    task = _stage_c_task(sets=["model.overrides={c: 64, nhead: 4, dropout: 0.0}", "validation.retrieval_captions=8"])
    task.train_probe = probe
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    batch = to_tensors(probe, torch.device("cpu"))
    for _ in range(400):  # (measured: all 8 found from step ~300)
        optimizer.zero_grad()
        task.loss(model, batch, generator).backward()
        optimizer.step()
    figures = task.validation_loss(model, held)
    assert set(figures) == {"loss", "condition_gap",
                            *(f"{s}_{k}" for s in ("retrieval", "train_retrieval") for k in ("top1", "top10", "median_rank"))}
    assert figures["train_retrieval_top1"] >= 0.75, figures
    assert figures["retrieval_median_rank"] > 3, figures  # 32 candidates: chance's median rank is 16.5
    task.train_probe = {**probe, "text_embeddings": np.roll(probe["text_embeddings"], 1, axis=0)}
    misaligned = task.validation_loss(model, held)
    assert misaligned["train_retrieval_top1"] <= 0.25, misaligned
    assert task.validation_loss(model, held) == misaligned, "seeded: the same figures again"


class _ListShard:
    """A worker's dataset shard holding `batches` (numpy dicts), the same every epoch."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def iter_batches(self, **kwargs):
        return iter(self.batches)


def _fsdp2_bf16_worker(rank: int, port: int, out: str) -> None:
    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.loop import train_step, validate
    from pipelines.training.parallel import reshard
    from pipelines.training.state import TrainState
    from stages.blocks import AttnBlock
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    lines = []
    for precision in ("fp32", "bf16"):
        cfg = load(TrainConfig, None, ["model.flavor=tiny", "parallel.strategy=fsdp2", "ema.decay=0.5",
                                       f"parallel.precision={precision}", "parallel.reshard_after_forward=false",
                                       "model.overrides={dropout: 0.0}", "objective.caption_dropout=0.0"])
        task = _stage_c_task(sets=["model.overrides={dropout: 0.0}", "objective.caption_dropout=0.0"])
        torch.manual_seed(0)
        batches = EqualStepBatches(_ListShard(_held_out(2, 4, seed=rank)), 4, torch.device("cpu"))
        state = TrainState.build(cfg.model.build(), batches, cfg, torch.device("cpu"))
        seen = {}
        attn = next(m for m in state.model.modules() if isinstance(m, AttnBlock))
        attn.register_forward_hook(lambda m, args, output: seen.setdefault("block", m.attention.to_q.weight.dtype) and None)
        state.model.register_forward_hook(lambda m, args, output: seen.setdefault("root", m.projection.weight.dtype) and None)
        losses = [float(train_step(state, task, cfg, rank)[0]) for _ in range(3)]
        with state.autocast():
            validate(state.model, state.ema, _held_out(1, 4, seed=5), task)  # forwards with no backward, EMA swaps
        reshard(state.model)
        stored = {str(p.dtype) for p in state.model.parameters()} | {str(s.dtype) for s in state.ema.shadow.values()}
        sharded = all(isinstance(p, DTensor) for p in state.model.parameters())  # gathered ones are plain tensors
        lines.append(f"{precision} {seen['block']} {seen['root']} {sorted(stored)} {sharded} {' '.join(f'{x:.6f}' for x in losses)}")
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines))
    dist.destroy_process_group()


@pytest.mark.integration  # two spawned processes training over gloo
def test_fsdp2_with_the_bf16_policy_gathers_blocks_in_bf16_and_keeps_fp32_weights(tmp_path):
    """parallel.precision=bf16 with FSDP2 on two ranks: inside a block's forward its weights are bf16
    (gathered so), the root's are fp32; the sharded weights and the EMA stay fp32; after forwards
    with no backward (validation, the EMA swaps), every unit is sharded again; the losses follow the
    fp32 run's within bf16's error."""
    mp.start_processes(_fsdp2_bf16_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    for rank in range(2):
        fp32, bf16 = [line.split(" ", 5) for line in Path(tmp_path, f"rank{rank}.txt").read_text().splitlines()]
        assert fp32[:5] == ["fp32", "torch.float32", "torch.float32", "['torch.float32']", "True"]
        assert bf16[:5] == ["bf16", "torch.bfloat16", "torch.float32", "['torch.float32']", "True"]
        reference, low = np.array(fp32[5].split(), float), np.array(bf16[5].split(), float)
        assert np.allclose(low, reference, rtol=0.05), (low, reference)


def test_bucket_batches_draw_one_bucket_a_batch_by_weight_and_resume_to_the_same_draws():
    """BucketBatches: each draw one bucket's batch, the buckets drawn by their weights from (seed,
    draw) alone, so every rank draws the same bucket and a resumed run the same sequence."""
    from pipelines.training.data import BucketBatches, EqualStepBatches

    def shards():
        rng = np.random.default_rng(0)
        return {b: _ListShard([{"key": np.array([f"{b}-{i}-{j}" for j in range(2)], dtype=object),
                                "stage_c_latents": rng.standard_normal((2, 16, *shape)).astype(np.float32)}
                               for i in range(4)])
                for b, shape in (("a", (3, 3)), ("b", (2, 4)))}

    def batches():
        per = {b: EqualStepBatches(shard, 2, torch.device("cpu")) for b, shard in shards().items()}
        return BucketBatches(per, {"a": 3.0, "b": 1.0}, seed=5)

    first = batches()
    drawn = [first.next() for _ in range(40)]
    names = [batch["key"][0].split("-")[0] for batch in drawn]
    assert all(len({k.split("-")[0] for k in batch["key"]}) == 1 for batch in drawn)  # one bucket a batch
    assert [tuple(b["stage_c_latents"].shape[2:]) for b in drawn] == [(3, 3) if n == "a" else (2, 4) for n in names]
    assert 0.6 < names.count("a") / len(names) < 0.9  # weighted 3:1
    again = batches()
    position = None
    for i in range(40):
        if i == 17:
            position = again.state_dict()
            again = batches()
            again.load_state_dict(position)
        assert again.next()["key"] == drawn[i]["key"], i
    assert position["draws"] == 17 and set(position["buckets"]) == {"a", "b"}
