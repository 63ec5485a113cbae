"""The pieces the Stage C trainer composes, one job per file: config, data, parallelism, EMA,
checkpoints, tracking, and the per-worker loop."""
