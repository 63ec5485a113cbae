"""`wuerstchen export --overwrite`: only a folder an earlier export wrote is replaced, and a failed export
leaves it as it was. (A successful export, and replacing one, is tested in test_registry.py.)"""

import pytest

from pipelines import export as export_job


@pytest.fixture
def store(tmp_path):
    """An empty local MLflow store: the model the tests ask for does not exist, so the export fails."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_a_folder_an_export_did_not_write(tmp_path, store):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "keep.py").write_text("print('mine')\n")
    with pytest.raises(FileExistsError, match="not written by `wuerstchen export`"):
        export_job.export("models:/absent/1", work, store, overwrite=True)
    assert _tree(work) == {"src/keep.py": b"print('mine')\n"}


def test_overwrite_of_the_working_directory_is_refused_by_the_cli(tmp_path, store, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    code = export_job.main(["--model", "models:/absent/1", "--out", ".", "--overwrite", "--tracking-uri", store])
    assert code == 2
    assert "working directory" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


def test_a_failed_export_keeps_the_earlier_export(tmp_path, store):
    import mlflow.exceptions

    earlier = tmp_path / "exported"
    (earlier / "prior").mkdir(parents=True)
    (earlier / "prior" / "config.json").write_text("{}")
    (earlier / "REGISTRY_SOURCE.txt").write_text("models:/wuerstchen-stage-c/3\nrun-abc\n")
    before = _tree(earlier)
    with pytest.raises(mlflow.exceptions.MlflowException):  # the registry has no such model
        export_job.export("models:/absent/1", earlier, store, overwrite=True)
    assert _tree(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "mlflow.db"], "no staging folder left behind"
    # Without --overwrite an earlier export is not touched either, and the error says how to replace it.
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_job.export("models:/absent/1", earlier, store)
