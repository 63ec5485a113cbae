"""The package as users run it: import boundaries, the console script, the jobs as modules."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import ConfigError
from pipelines import cli
from stages import StageC
from stages.original_format import to_original

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration  # each test runs the project's code in a child process


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_stages_import_nothing_from_ray_mlflow_or_diffusers():
    code = "import sys, stages; bad = sorted(m for m in ('ray', 'mlflow', 'diffusers') if m in sys.modules); print(bad)"
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_jobs_run_as_modules_from_the_working_dir_without_installing(tmp_path):
    """`ray job submit --working-dir .` runs `python -m pipelines.X` in a copy of the repo, where only
    the folder itself is on the path: `-I` isolates from site-packages' editable install of the project."""
    code = "import runpy, sys; sys.path.insert(0, '.'); sys.argv = ['flavors']; runpy.run_module('pipelines.flavors', run_name='__main__')"
    result = _run(sys.executable, "-I", "-c", code)
    assert result.returncode == 0, result.stderr
    assert "993,636,896" in result.stdout  # the v2 prior


def test_console_script_lists_its_commands():
    script = Path(sys.executable).with_name("wuerstchen")
    result = _run(str(script), "--help")
    assert result.returncode == 0 and "demo" in result.stdout and "convert" in result.stdout
    result = _run(str(script), "no-such-command")
    assert result.returncode == 2 and "unknown command 'no-such-command'" in result.stderr


def test_demo_runs_every_stage_and_round_trips_them(tmp_path):
    result = _run(sys.executable, "-m", "pipelines.demo", "--stages-only", "--flavor", "tiny", "--image-size", "128", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "identical" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder", "prior", "vqgan"]


def test_convert_writes_a_folder_that_loads(tmp_path):
    model = StageC.from_flavor("tiny").eval()
    torch.save({"ema_state_dict": to_original(model.state_dict())}, tmp_path / "stage_c.pt")
    result = _run(
        sys.executable, "-m", "pipelines.convert", "--stage", "c", "--flavor", "tiny",
        "--checkpoint", str(tmp_path / "stage_c.pt"), "--out", str(tmp_path / "prior"),
    )
    assert result.returncode == 0, result.stderr
    loaded = StageC.from_pretrained(tmp_path / "prior")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("job", sorted(cli.COMMANDS))
def test_every_job_says_what_it_does_and_its_exit_codes(job, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([job, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    module = importlib.import_module(f"pipelines.{cli.COMMANDS[job][0]}")
    assert text.startswith(f"usage: wuerstchen {job}") and module.__doc__.splitlines()[0] in text
    codes = dict(re.findall(r"^  (\d)  (\S.*)$", text.split("\nexit codes:\n")[1], re.M))
    # argparse itself exits 2 on a bad argument, and every job may fail
    assert {str(cli.DONE), str(cli.FAILED), str(cli.BAD_INPUT)} <= set(codes), text
    if job == "retrain":
        assert {"4", "5"} <= set(codes) and "lease" in codes["4"] and "lease" in codes["5"], text


def test_errors_become_exit_codes_with_one_line_or_a_traceback(capsys):
    class Lost(RuntimeError):
        pass

    def fails(err: Exception):
        def work():
            raise err
        return work

    assert cli.run_job("x", fails(ConfigError("bad.yaml: steps: is required"))) == cli.BAD_INPUT
    assert capsys.readouterr().err == "wuerstchen x: bad.yaml: steps: is required\n"
    assert cli.run_job("x", fails(FileNotFoundError("no cache at /nowhere"))) == cli.BAD_INPUT
    assert capsys.readouterr().err == "wuerstchen x: no cache at /nowhere\n"
    assert cli.run_job("x", fails(Lost("taken over")), {Lost: 5}) == 5
    assert capsys.readouterr().err == "wuerstchen x: taken over\n"
    assert cli.run_job("x", fails(RuntimeError("worker died\nits traceback"))) == cli.FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "wuerstchen x: failed: RuntimeError: worker died"
    assert cli.run_job("x", lambda: None) == cli.DONE and cli.run_job("x", lambda: 4) == 4
