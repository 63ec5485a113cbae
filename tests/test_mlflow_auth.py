"""The MLflow server as deployed (infra/k8s/mlflow/): its `basic-auth` app with the shipped
basic_auth.ini and the users that infra/docker/mlflow/mlflow_users.py creates, run here as a real
`mlflow server` (sqlite backend instead of PostgreSQL). Anonymous clients can do nothing; the read-only
consumer reads and loads the champion but cannot register a version or move an alias; the jobs' writer can."""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest
import mlflow
import mlflow.pyfunc
import yaml
from conftest import free_port, stop_server, wait_for_port

pytestmark = pytest.mark.integration  # its own MLflow server, with the auth app

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_YAML = ROOT / "infra" / "k8s" / "mlflow" / "mlflow.yaml"
USERS_SCRIPT = ROOT / "infra" / "docker" / "mlflow" / "mlflow_users.py"
MODEL = "wuerstchen-stage-c"
# Throwaway credentials of this test's own server.
ADMIN, WRITER, READER = ("admin", "admin-pass-1234"), ("trainer", "writer-pass-1234"), ("consumer", "reader-pass-1234")


def _manifest(kind: str, name: str) -> dict:
    docs = [d for d in yaml.safe_load_all(MLFLOW_YAML.read_text()) if d]
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _users_job_args() -> list[str]:
    (container,) = _manifest("Job", "wuerstchen-mlflow-users")["spec"]["template"]["spec"]["containers"]
    return container["args"]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` with the ini of the deployed ConfigMap (its database moved to
    sqlite here), then the users script with the Job's arguments."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    shipped = _manifest("ConfigMap", "wuerstchen-mlflow-auth")["data"]["basic_auth.ini"]
    ini = configparser.ConfigParser()
    ini.read_string(shipped)
    ini["mlflow"]["database_uri"] = f"sqlite:///{root / 'auth.db'}"
    with open(root / "basic_auth.ini", "w") as f:
        ini.write(f)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # An earlier test's mlflow.set_tracking_uri / set_registry_uri leave their URIs in the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_REGISTRY_URI"))}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-flask-key"}
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"),
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        # The auth app migrates its own tables too: slower to start than the plain server on a busy machine.
        wait_for_port(port, timeout=300, process=process)
        users = subprocess.run(
            [sys.executable, str(USERS_SCRIPT), *_users_job_args()], capture_output=True, text=True, timeout=120,
            # A registry URI left in the environment (as a job's own set_registry_uri leaves it) must not
            # send the script's models elsewhere: it writes to the server it is told, registry included.
            env=env | {"MLFLOW_REGISTRY_URI": "http://127.0.0.1:9", "MLFLOW_TRACKING_URI": uri,
                       "MLFLOW_TRACKING_USERNAME": ADMIN[0],
                       "MLFLOW_TRACKING_PASSWORD": ADMIN[1], "MLFLOW_WRITER_USERNAME": WRITER[0],
                       "MLFLOW_WRITER_PASSWORD": WRITER[1], "MLFLOW_READER_USERNAME": READER[0],
                       "MLFLOW_READER_PASSWORD": READER[1]},
        )
        assert users.returncode == 0, users.stdout + users.stderr
        yield {"uri": uri, "root": root}
    finally:
        stop_server(process, log)


def _as(monkeypatch, user: tuple[str, str] | None):
    """The client identity: MLflow's clients read these variables at every request."""
    for key, value in zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), user or (None, None)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)




class Doubler(mlflow.pyfunc.PythonModel):
    """A stand-in for the registered Stage C: what matters here is who may register and load it."""

    def predict(self, context, model_input, params=None):
        return [2 * x for x in model_input]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


@pytest.fixture(scope="module")
def champion(auth_server):
    """The writer (the jobs' identity) logs a model, registers it and makes it champion."""
    uri = auth_server["uri"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _as(monkeypatch, WRITER)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        client = _client(uri)
        experiment = client.get_experiment_by_name(MODEL)
        run = client.create_run(experiment.experiment_id, run_name="writer")
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=Doubler(), pip_requirements=["mlflow"])
        version = mlflow.register_model(info.model_uri, MODEL)  # as pipelines.register does
        client.set_registered_model_alias(MODEL, "champion", version.version)
        client.set_registered_model_alias(MODEL, "challenger", version.version)
        client.delete_registered_model_alias(MODEL, "challenger")  # what pipelines.promote does
    return {"uri": uri, "version": version.version, "source": info.model_uri, "run_id": run.info.run_id}


def _status(err) -> int | None:
    return getattr(err.value, "get_http_status_code", lambda: None)()


@pytest.mark.parametrize("user", [None, READER], ids=["anonymous", "reader"])
def test_only_the_writer_registers_and_moves_champion(champion, monkeypatch, user):
    from mlflow.exceptions import MlflowException

    _as(monkeypatch, user)
    client = _client(champion["uri"])
    refused = 401 if user is None else 403
    with pytest.raises(MlflowException) as err:
        client.create_model_version(MODEL, champion["source"], run_id=champion["run_id"])
    assert _status(err) == refused, err.value
    with pytest.raises(MlflowException) as err:
        client.set_registered_model_alias(MODEL, "champion", champion["version"])
    assert _status(err) == refused, err.value
    with pytest.raises(MlflowException) as err:
        client.delete_registered_model_alias(MODEL, "champion")
    assert _status(err) == refused, err.value
    with pytest.raises(MlflowException) as err:
        client.create_registered_model("wuerstchen-decoders")  # made by the users script, owned by the writer
    assert _status(err) in (refused, 400), err.value
    _as(monkeypatch, WRITER)
    assert _client(champion["uri"]).get_model_version_by_alias(MODEL, "champion").version == champion["version"]
    assert len(_client(champion["uri"]).search_model_versions(f"name='{MODEL}'")) == 1


def test_anonymous_clients_cannot_even_read(champion, monkeypatch):
    from mlflow.exceptions import MlflowException

    _as(monkeypatch, None)
    with pytest.raises(MlflowException) as err:
        _client(champion["uri"]).get_model_version_by_alias(MODEL, "champion")
    assert _status(err) == 401


def test_the_reader_loads_the_champion(champion, monkeypatch):
    _as(monkeypatch, READER)
    mlflow.set_tracking_uri(champion["uri"])
    mlflow.set_registry_uri(champion["uri"])
    assert _client(champion["uri"]).get_model_version_by_alias(MODEL, "champion").version == champion["version"]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert list(model.predict([1, 2])) == [2, 4]


def test_the_users_script_is_idempotent_and_refuses_missing_settings(champion):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base = env | {"MLFLOW_TRACKING_URI": champion["uri"], "MLFLOW_TRACKING_USERNAME": ADMIN[0],
                  "MLFLOW_TRACKING_PASSWORD": ADMIN[1], "MLFLOW_WRITER_USERNAME": WRITER[0],
                  "MLFLOW_WRITER_PASSWORD": WRITER[1], "MLFLOW_READER_USERNAME": READER[0]}
    missing = subprocess.run([sys.executable, str(USERS_SCRIPT), *_users_job_args()], env=base,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "MLFLOW_READER_PASSWORD" in missing.stderr
    again = subprocess.run([sys.executable, str(USERS_SCRIPT), *_users_job_args()], capture_output=True, text=True,
                           env=base | {"MLFLOW_READER_PASSWORD": READER[1]}, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
