"""MLflow tracking from world rank 0 that survives a tracking server that is briefly away: metrics
that cannot be sent are kept, a warning is logged, and they are sent with the next batch."""

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

RUN_NAME_TAG = "wuerstchen.run_name"
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


def start_or_resume_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict) -> str:
    """The id of this run name's MLflow run: the existing one when the run is resumed, else a new one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    items = list(params.items())
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])
    return run.info.run_id


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
