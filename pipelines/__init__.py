"""The jobs. Each runs as `python -m pipelines.<job>`, also under `ray job submit --working-dir .`."""
