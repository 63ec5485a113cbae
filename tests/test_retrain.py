"""The scheduled retraining workflow as it runs in production: `ray job submit --working-dir .` against
a real `ray start --head` cluster on loopback (token auth, as Ray 2.60 sets it up), a real MLflow
server over HTTP (artifacts on moto's S3), source shards arriving over time."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TRAIN_POLLING, free_ports, wait_for_port
from prep_factory import good, write_tar

from pipelines import registry

REPO = Path(__file__).resolve().parents[1]
MODEL = "stage-c-retrain"
BIN = Path(sys.executable).parent


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def ray_head(mlflow_server, tmp_path_factory):
    """`ray start --head --block` in its own process group, stopped by signalling that group (`ray
    stop` would also stop the test session's other local cluster)."""
    temp = tmp_path_factory.mktemp("rayhead")
    # Every port of its own: another Ray on this machine (the session's local cluster) holds the defaults.
    flags = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    port, dashboard, *ports = free_ports(2 + len(flags))
    own_ports = [f"--{flag}={p}" for flag, p in zip(flags, ports)]
    log = open(temp / "ray-start.log", "w")
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--disable-usage-stats",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}", *own_ports],
        # On SIGTERM the head first drains itself for Serve, asking the GCS, which the same signal stopped:
        # 30 s lost at every teardown. This cluster has nothing to drain.
        env=_env() | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"} | TRAIN_POLLING,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(dashboard, timeout=120, process=process)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def _shard(folder: Path, index: int, rows: int = 14) -> None:
    members = []
    for i in range(rows):
        members += good(f"s{index}/img{i}", 5000 + index * 100 + i)
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(folder / f"shard-{index:03d}.tar", members)


def _config(root: Path, uri: str, steps: int = 6, every: int = 3, lora: bool = False) -> Path:
    config = {
        "prep": {
            "source": {"url": str(root / "src"), "format": "webdataset"},
            "filters": {"min_side": 64},
            "encode": {"flavor": "tiny", "resolution": 128, "batch_size": 16},
            "output": {"url": str(root / "cache"), "shards_per_wave": 1},
        },
        "train": {
            # a LoRA fine-tune of the champion: an adapter of rank 2, registered alone, pinning it
            "model": {"flavor": "tiny"} | ({"init": f"models:/{MODEL}@champion", "lora": {"rank": 2}} if lora else {}),
            "data": {"batch_size": 4, "validation_fraction": 0.2},
            "optim": {"lr": 0.001},
            "ema": {"decay": 0.9},
            "validation": {"every_steps": steps, "retrieval_captions": 4},
            "checkpoint": {"storage_path": str(root / "runs"), "run_name": "rt", "every_steps": every},
            "parallel": {"num_workers": 1, "cpus_per_worker": 1},
            "tracking": {"tracking_uri": uri, "experiment": "tests-retrain", "log_every": 5},
            "steps": steps,
        },
        "model_name": MODEL,
        # The workflow, on the held-out loss (a few steps of a tiny prior are not above the default gate's
        # retrieval floor, whose own test is in test_registry).
        "gate": {"primary": "val_loss", "max_rank_vs_chance": None, "tie_breaker": None, "guard_rails": {},
                 "min_relative_improvement": 0.0},
        "data_mix": {"mode": "replay", "replay_fraction": 0.5},
        "lease": {"stale_after_s": 8, "heartbeat_s": 2},
    }
    path = root / f"retrain-{steps}{'-lora' if lora else ''}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ray(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _submit(address: str, config: Path, submission_id: str, wait: bool = False) -> str:
    """Submits the retraining job; with `wait`, follows its log to the end (one `ray` process, not a poll
    of `ray job status`, which costs seconds of CPU a call on this 2-core machine) and returns it, with
    the final status line."""
    deadline = time.monotonic() + 120
    while True:
        try:
            out = _ray("job", "submit", f"--address={address}", "--working-dir=.", f"--submission-id={submission_id}",
                       *([] if wait else ["--no-wait"]), "--", "python", "-m", "pipelines.retrain", "--config", str(config))
        except subprocess.TimeoutExpired:
            actors = _ray("list", "actors", f"--address={address}", "--filter", "state=ALIVE", timeout=60)
            raise TimeoutError(f"job {submission_id} still {_status(address, submission_id)} after 600 s; live actors:\n"
                               f"{actors.stdout[-3000:]}\njob log:\n{_logs(address, submission_id)[-6000:]}") from None
        # A head that just started answers before its job agent is up: that one is worth a retry.
        if "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    # Waiting, a failed job exits 1: the caller checks the status.
    assert out.returncode == 0 or (wait and _final_status(out.stdout + out.stderr, submission_id) == "FAILED"), \
        out.stdout + out.stderr
    return out.stdout + out.stderr


def _final_status(text: str, submission_id: str) -> str:
    """The status that `ray job status` prints, or that `ray job submit` / `ray job logs --follow` print
    when the job has ended."""
    job = re.escape(submission_id)
    for pattern, status in ((rf"Job '{job}' succeeded", "SUCCEEDED"), (rf"Job '{job}' failed", "FAILED"),
                            (rf"Job '{job}' was stopped", "STOPPED")):
        if re.search(pattern, text):
            return status
    found = re.search(rf"Status for job '{job}': (\w+)", text)
    return found[1] if found else "UNKNOWN: " + text[-1000:]


def _status(address: str, submission_id: str) -> str:
    out = _ray("job", "status", f"--address={address}", submission_id, timeout=60)
    return _final_status(out.stdout + out.stderr, submission_id)


def _logs(address: str, submission_id: str) -> str:
    return _ray("job", "logs", f"--address={address}", submission_id, timeout=60).stdout


def _run(address: str, config: Path, submission_id: str) -> tuple[str, str]:
    """Submits the job and waits for its end: its status and its log."""
    logs = _submit(address, config, submission_id, wait=True)
    return _final_status(logs, submission_id), logs


class _Follower:
    """`ray job logs --follow` of a job, into a file that the test reads as often as it likes: the job's
    log as it grows, and the status line once the job has ended."""

    def __init__(self, address: str, submission_id: str, folder: Path):
        self.submission_id, self.path = submission_id, folder / f"{submission_id}.log"
        self.file = open(self.path, "w")
        self.process = subprocess.Popen([str(BIN / "ray"), "job", "logs", f"--address={address}", "--follow", submission_id],
                                        env=_env(), cwd=REPO, stdout=self.file, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.path.read_text()

    def ended(self) -> bool:
        return self.process.poll() is not None

    def status(self) -> str:
        return _final_status(self.text(), self.submission_id) if self.ended() else "RUNNING"

    def wait(self, timeout: float = 600) -> tuple[str, str]:
        self.process.wait(timeout=timeout)
        self.file.close()
        return self.status(), self.text()


def _versions(uri: str) -> list:
    return registry.versions(registry.client(uri), MODEL)


def _summary(logs: str) -> dict:
    text = logs[logs.rindex("retrain summary: ") + len("retrain summary: "):]
    return json.JSONDecoder().raw_decode(text)[0]


def test_retrain_jobs_new_shards_only_from_the_champion_one_at_a_time_and_resumed_after_a_kill(ray_head, mlflow_server, tmp_path):
    uri = mlflow_server
    _shard(tmp_path / "src", 0)
    config = _config(tmp_path, uri)

    status, logs = _run(ray_head, config, "retrain-first")
    assert status == "SUCCEEDED", logs[-4000:]
    first = _summary(logs)
    assert first["decision"] == "promoted" and first["base_version"] is None and first["rows_added"] > 0
    assert [v.version for v in _versions(uri)] == ["1"]
    assert registry.version_by_alias(registry.client(uri), MODEL, registry.CHAMPION).version == "1"
    stored = json.loads((tmp_path / "runs" / "retrain" / "summaries" / f"{first['attempt_id']}.json").read_text())
    assert stored == first

    status, logs = _run(ray_head, config, "retrain-nothing")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "nothing to do" in logs and _summary(logs)["decision"] == "nothing_to_do"
    assert [v.version for v in _versions(uri)] == ["1"]

    # A new shard, and two runs started at once: one refuses; the other prepares only that shard and
    # fine-tunes the champion (a LoRA adapter on it, the common fine-tune), and is killed mid-training.
    # Rerun, it finishes the same attempt from its checkpoint and registers exactly one new version.
    _shard(tmp_path / "src", 1, rows=48)
    # Long enough that the stop lands mid-training: `ray job stop` takes several seconds, in which a
    # tiny model on a fast machine trained the last 25 of 40 steps and registered a version.
    long = _config(tmp_path, uri, steps=200, every=10, lora=True)
    _submit(ray_head, long, "retrain-a")
    _submit(ray_head, long, "retrain-b")
    jobs = {sid: _Follower(ray_head, sid, tmp_path) for sid in ("retrain-a", "retrain-b")}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(job.ended() for job in jobs.values()):
        time.sleep(0.5)
    ended = [sid for sid, job in jobs.items() if job.ended()]
    assert [jobs[sid].status() for sid in ended] == ["FAILED"], {sid: job.text()[-3000:] for sid, job in jobs.items()}
    (refused,) = ended
    running = next(sid for sid in jobs if sid != refused)
    assert "refused: another run" in jobs[refused].wait()[1]
    while time.monotonic() < deadline and "step 15/200" not in jobs[running].text():
        time.sleep(0.5)
    assert _status(ray_head, running) == "RUNNING"
    _ray("job", "stop", f"--address={ray_head}", running, timeout=120)
    status, logs = jobs[running].wait()
    assert status == "STOPPED" and "retrain summary" not in logs
    assert [v.version for v in _versions(uri)] == ["1"]
    assert (tmp_path / "runs" / "retrain" / "attempt.json").is_file()

    time.sleep(8)  # lease.stale_after_s: the killed run's lease expires
    status, logs = _run(ray_head, long, "retrain-rerun")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "resuming attempt" in logs and "resuming rt-retrain-" in logs  # training resumed from its checkpoint
    second = _summary(logs)
    assert second["new_shards"] == [f"file://{tmp_path}/src/shard-001.tar"]
    assert second["base_version"] == "1" and second["candidate_version"] == "2" and second["candidate_created"]
    assert second["decision"] in ("promoted", "kept") and second["challenger_val_loss"] is not None
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == [f"file://{tmp_path}/src/shard-00{i}.tar" for i in (0, 1)]
    assert manifest["shards"][f"file://{tmp_path}/src/shard-000.tar"]["wave"] != manifest["shards"][second["new_shards"][0]]["wave"]
    run = registry.client(uri).get_run(second["training_run_id"])
    assert run.data.params["model.init"] == f"models:/{MODEL}/1" and run.data.tags["lora.base"] == f"models:/{MODEL}/1"
    # The version holds the adapter alone and pins the champion it was trained on; models:/ merges them.
    assert registry.model_config_of(f"models:/{MODEL}/2")["lora_base"] == f"models:/{MODEL}/1"
    registry.download(f"models:/{MODEL}/2", tmp_path / "lora-version")
    assert [p.name for p in (tmp_path / "lora-version").rglob("*.safetensors")] == ["pytorch_lora_weights.safetensors"]
    base, tuned = (registry.load_stage_c(f"models:/{MODEL}/{v}", uri).state_dict() for v in (1, 2))
    assert base.keys() == tuned.keys() and any(not torch.equal(base[k], tuned[k]) for k in base)
    assert run.data.tags["retrain.decision"] == second["decision"]
    assert [v.version for v in _versions(uri)] == ["1", "2"]
    assert not (tmp_path / "runs" / "retrain" / "attempt.json").exists()



def test_a_resumed_attempt_prepares_only_its_own_shards(ray_cluster, mlflow_server, tmp_path):
    """A shard that arrives while an attempt is unfinished is the next attempt's, in full: the resumed
    attempt prepares exactly the shards it recorded. (Prepared now, the newcomer would be trained on
    only as replay, and no later run would find it new.)"""
    from core.config import load
    from pipelines.retrain import RetrainConfig, new_shards, run_retrain

    _shard(tmp_path / "src", 0, rows=6)
    # Training refuses this batch size before any worker starts: each run stops right after prep, as
    # one killed during training would.
    cfg = load(RetrainConfig, _config(tmp_path, mlflow_server), ["train.data.batch_size=1000"])
    first, second = (f"file://{tmp_path}/src/shard-00{i}.tar" for i in (0, 1))
    with pytest.raises(ValueError, match="fewer than data.batch_size"):
        run_retrain(cfg)
    assert json.loads((tmp_path / "runs" / "retrain" / "attempt.json").read_text())["new_shards"] == [first]

    _shard(tmp_path / "src", 1, rows=6)
    with pytest.raises(ValueError, match="fewer than data.batch_size"):
        run_retrain(cfg)  # resumes the same attempt
    assert sorted(json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"]) == [first]
    assert new_shards(cfg) == [second]


def test_a_lora_retrain_with_no_champion_yet_is_refused_before_anything_is_prepared(mlflow_server, tmp_path):
    """A LoRA adapter pins a registered base: with no champion there is none, so the run stops before
    prep and records no attempt (a rerun once a champion exists starts afresh from it)."""
    from core.config import load
    from pipelines.retrain import RetrainConfig, run_retrain

    _shard(tmp_path / "src", 0, rows=2)
    cfg = load(RetrainConfig, _config(tmp_path, mlflow_server), ["train.model.init=models:/none-yet@champion",
                                                                 "train.model.lora.rank=2", f"model_name={MODEL}-unborn"])
    with pytest.raises(ValueError, match="fine-tunes the champion of 'stage-c-retrain-unborn', which has none yet"):
        run_retrain(cfg)
    assert not (tmp_path / "runs" / "retrain" / "attempt.json").exists() and not (tmp_path / "cache").exists()
