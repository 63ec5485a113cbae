"""Data preparation on Ray Data: read image-text pairs, filter them with a counted funnel, and
pre-encode them once into a parquet cache of latents (semantic, Stage A) and text conditioning.

    sources/      one reader per source format (webdataset, parquet, folder, twemoji), in a registry
    operators.py  the Ray Data operators (decode + filter, CLIP score, dedup, encode) and their line
    runner.py     run_prep: plan -> dataset -> writer (latent_cache/writer.py) -> summary
    summary.py    the run's summary as the job prints it
    config.py     what a run is told (YAML); decode, filters, hashing, transforms: the operators' parts
"""
