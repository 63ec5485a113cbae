"""Data preparation on Ray Data: read image-text pairs, filter them with a counted funnel, and
pre-encode them once into a parquet cache of latents (semantic, Stage A) and text conditioning."""
