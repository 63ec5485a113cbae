"""MLflow tracking from world rank 0 that survives a tracking server that is briefly away: metrics
that cannot be sent are kept, a warning is logged, and they are sent with the next batch."""

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from core.config import ConfigError

log = logging.getLogger(__name__)

RUN_NAME_TAG = "wuerstchen.run_name"
CONFIG_HASH_TAG = "wuerstchen.config_hash"
# The train config keys that may change when a run is resumed: how long it trains, where it runs,
# with what failure budget, how often it logs, validates and checkpoints, how it saves memory and
# time (checkpointing, compile, FSDP2's resharding: the same maths).
# Every other key defines the run (a key added later does too, until listed here): the same
# run name with another value is another run, refused (see start_or_resume_run).
RESUMABLE_KEYS = (
    "steps",
    "max_failures",
    "ray_address",
    "num_cpus",
    "tracking",
    "fault",
    "checkpoint.every_steps",
    "checkpoint.num_to_keep",
    "validation.every_steps",
    "parallel.cpus_per_worker",
    "model.activation_checkpointing",
    "model.compile",
    "parallel.reshard_after_forward",
    "parallel.gpu_memory_gib",
    "parallel.memory_check",
)
# The most metric values held back while the server is away (oldest dropped beyond it).
MAX_PENDING = 100_000
LOCAL_ARTIFACT_ROOT_ENV = "_MLFLOW_SERVER_ARTIFACT_ROOT"  # mlflow.tracking._tracking_service.utils


def tracking_uri(configured: str | None) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else an sqlite store under runs/. An sqlite store
    keeps its artifacts beside its database file (runs/mlartifacts/), not in ./mlruns."""
    if configured:
        uri = configured
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    else:
        path = Path("runs/mlflow.db").absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    if uri.startswith("sqlite:///"):
        # MLflow roots a local store's experiments (Default included, made with the database) at
        # ./mlruns of the working directory. It has no client setting for this; the variable below is
        # the one `mlflow server` sets for the stores it opens itself, read when a store is opened.
        database = Path(uri.removeprefix("sqlite:///")).absolute()
        os.environ[LOCAL_ARTIFACT_ROOT_ENV] = str(database.parent / "mlartifacts")
    return uri


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def defining_config(config: dict) -> dict:
    """A train config (as a dict) without the keys that may change on resume."""
    out = copy.deepcopy(config)
    for key in RESUMABLE_KEYS:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return out


def config_hash(config: dict) -> str:
    """The hash of what defines a training run: the same for a resume, another for another run."""
    return hashlib.sha256(json.dumps(defining_config(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(recorded: dict[str, str], config: dict) -> list[str]:
    """The defining keys whose flattened value differs between `recorded` (a run's params) and `config`.
    A key the recorded run does not have (added to TrainConfig since) is no change while it holds its
    default: the run was trained as that default says (e.g. model.stage "c" for a run of the days
    when Stage C was the only model), so an upgrade does not strand runs in progress."""
    import dataclasses

    from pipelines.training.config import TrainConfig

    current = flatten(defining_config(config))
    defined = flatten(defining_config(_unflatten(recorded)))
    defaults = flatten(defining_config(json.loads(json.dumps(dataclasses.asdict(TrainConfig())))))
    return [f"{k}: {defined.get(k, '(absent)')} -> {current.get(k, '(absent)')}"
            for k in sorted(set(current) | set(defined))
            if current.get(k) != defined.get(k) and not (k not in defined and k in defaults and current[k] == defaults[k])]


def _unflatten(flat: dict[str, str]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def start_or_resume_run(uri: str, experiment: str, run_name: str, config: dict, tags: dict, owner: str | None = None) -> str:
    """The id of this run name's MLflow run: the existing one when the run is resumed, else a new one.

    A run name is one config: an existing run with another config hash is refused (ConfigError),
    not continued, since its checkpoints (same name) would be resumed under a config they were not
    trained with. `owner`: the MLflow run that wrote the checkpoint to resume from, which must be
    the one found."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    digest = config_hash(config)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run = found[0]
        recorded = run.data.tags.get(CONFIG_HASH_TAG)
        changes = config_changes(run.data.params, config)
        if recorded != digest and changes:  # judged by its params: a run of older code may lack a key, or the tag
            raise ConfigError(
                f"checkpoint.run_name={run_name!r} is MLflow run {run.info.run_id} (experiment {experiment!r}), started with "
                f"another config (hash {recorded}, this one {digest}): {'; '.join(changes[:10]) or 'see its params'}. "
                f"To train this config, give it a new checkpoint.run_name; to resume that run, restore its values "
                f"(only {', '.join(RESUMABLE_KEYS)} may change on resume)"
            )
        if owner is not None and owner != run.info.run_id:
            raise ConfigError(_not_the_owner(run_name, owner, f"MLflow run {run.info.run_id}"))
        if recorded is None:
            client.set_tag(run.info.run_id, CONFIG_HASH_TAG, digest)
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    if owner is not None:
        raise ConfigError(_not_the_owner(run_name, owner, f"no run of that name in experiment {experiment!r} at {uri}"))
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, CONFIG_HASH_TAG: digest, **tags})
    items = list(flatten(config).items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id


def _not_the_owner(run_name: str, owner: str, found: str) -> str:
    return (f"the checkpoints of checkpoint.run_name={run_name!r} were written by MLflow run {owner}, but the tracking "
            f"server has {found}: point tracking.tracking_uri / tracking.experiment at the server and experiment of run "
            f"{owner} to resume it, or give this run a new checkpoint.run_name")


class MetricLogger:
    """Buffers metrics and sends them in batches; a failed send keeps them for the next try."""

    def __init__(self, uri: str, run_id: str):
        # MLflow's client retries a dead server with backoff for minutes by default: a training step
        # must not wait that long. Fail fast, keep the metrics, try again at the next log.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.pending = []
        self.failing_since = None
        self.logged_through = 0  # steps up to this one are in the run already (see skip_logged)

    def skip_logged(self, key: str) -> None:
        """After a restart from a checkpoint: the steps after it that the failed attempt already
        logged are rerun but not logged again, so the run holds one value per step. (The rerun
        computes the same values: the data order and the noise are seeded by step and epoch.)"""
        try:
            self.logged_through = max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)
        except Exception as err:  # training goes on; at worst a few steps are logged twice
            log.warning("could not read the logged steps of MLflow run %s: %s", self.run_id, err)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        del self.pending[:-MAX_PENDING]
        self.flush()

    def tag(self, key: str, value: str) -> None:
        try:
            self.client.set_tag(self.run_id, key, value)
        except Exception as err:
            log.warning("could not set MLflow tag %s: %s", key, err)

    def image(self, image, artifact_file: str) -> None:
        """A picture (uint8 H x W x 3) as a run artifact; lost, with a warning, when MLflow is unreachable."""
        try:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)
        except Exception as err:
            log.warning("could not log %s to MLflow: %s", artifact_file, err)

    def flush(self) -> bool:
        while self.pending:
            chunk = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as err:  # an unreachable server raises many types; training must go on
                if self.failing_since is None:
                    self.failing_since = time.time()
                    log.warning("MLflow is unreachable (%s: %s); keeping %d metric values to send later",
                                type(err).__name__, err, len(self.pending))
                return False
            del self.pending[: len(chunk)]
        if self.failing_since is not None:
            log.warning("MLflow is reachable again after %.0f s; sent what was kept", time.time() - self.failing_since)
            self.failing_since = None
        return True
