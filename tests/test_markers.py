"""The unit / integration split of the suite (`make test-unit`, `make test-integration`): tests/conftest.py
marks a test `integration` when it uses a real service, directly or through another fixture, or says so
itself, and `unit` otherwise. Checked by collecting a sample file with this conftest and pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import pytest


@pytest.fixture
def trained(tiny_cache):
    return tiny_cache


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def state(request):
    return request.param


def test_pure():
    pass


def test_on_s3(s3_server):
    pass


def test_through_a_fixture_that_needs_the_cache(trained):
    pass


@pytest.mark.integration
def test_that_starts_its_own_process():
    pass


def test_state(state):
    pass


class TestGroup:
    def test_on_ray(self, ray_cluster, tmp_path):
        pass

    def test_plain(self, tmp_path):
        pass
'''

UNIT = {"test_pure", "test_state[local]", "TestGroup::test_plain"}
INTEGRATION = {"test_on_s3", "test_through_a_fixture_that_needs_the_cache", "test_that_starts_its_own_process",
               "test_state[s3]", "TestGroup::test_on_ray"}


def _collected(folder: Path, marker: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker, "test_sample.py"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {line.split("::", 1)[1] for line in done.stdout.splitlines() if line.startswith("test_sample.py::")}


def test_every_test_is_either_unit_or_integration_by_the_services_it_uses(tmp_path):
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    # The markers' registration too: its addopts hold --strict-markers, which refuses an unregistered one.
    shutil.copy(TESTS.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    assert _collected(tmp_path, "unit") == UNIT
    assert _collected(tmp_path, "integration") == INTEGRATION
