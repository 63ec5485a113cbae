"""The local MLflow store (sqlite) keeps its artifacts beside its database, under runs/ by default, not in
./mlruns of whatever directory a job or benchmark was started from."""

from mlflow.tracking import MlflowClient

from pipelines.training.tracking import start_or_resume_run, tracking_uri


def _log_one_artifact(uri: str, tmp_path) -> str:
    run_id = start_or_resume_run(uri, "local-store", "run-1", {"a": "1"}, {})
    note = tmp_path / "note.txt"
    note.write_text("hello\n")
    MlflowClient(uri).log_artifact(run_id, str(note))
    return run_id


def test_default_store_keeps_artifacts_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("_MLFLOW_SERVER_ARTIFACT_ROOT", raising=False)  # restored after the test
    uri = tracking_uri(None)
    run_id = _log_one_artifact(uri, tmp_path)
    assert not (tmp_path / "mlruns").exists(), "artifacts went to ./mlruns of the working directory"
    (found,) = (tmp_path / "runs").rglob("note.txt")
    assert run_id in found.parts
    assert MlflowClient(uri).download_artifacts(run_id, "note.txt", str(tmp_path / "back"))


def test_an_explicit_sqlite_store_keeps_artifacts_beside_its_database(tmp_path, monkeypatch):
    """What benchmarks/train_ingest.py does: a store in a temporary folder, removed with it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("_MLFLOW_SERVER_ARTIFACT_ROOT", raising=False)
    db = tmp_path / "bench" / "mlflow.db"
    db.parent.mkdir()
    _log_one_artifact(tracking_uri(f"sqlite:///{db}"), tmp_path)
    assert not (tmp_path / "mlruns").exists()
    assert list((tmp_path / "bench").rglob("note.txt"))
