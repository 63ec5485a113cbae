# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv when it is missing and installs what the project needs, pinned by constraints.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-decoders test test-unit test-integration venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wuerstchen demo

# Trains the demo's decoders into weights/twemoji-small-decoders (~1 h on 2 cores; resumable).
demo-decoders: $(STAMP)
	$(VENV)/bin/wuerstchen demo-decoders

# Unit tests first (in process, seconds), then integration tests on real parts (Ray, MLflow, moto's S3,
# jobs in their own processes); tests/conftest.py marks each test as one or the other.
test: test-unit test-integration

test-unit: $(STAMP)
	$(PY) -m pytest tests -m unit --durations=20

test-integration: $(STAMP)
	$(PY) -m pytest tests -m integration --durations=20

bench: $(STAMP)
	$(PY) -m benchmarks.stage_speed

clean:
	rm -rf $(VENV) .pytest_cache
