"""The latent cache: what data prep writes and every other job reads, local or on S3.

    spec.py       what a cache holds: CacheSpec (flavor, resolution, text mode, which latents, encoder
                  weights), its tensor columns, their shapes and dtypes
    manifest.py   manifest.json, the commit point: create, record a wave, check against a spec
    writer.py     the rows of a prep run -> parquet files in waves, each committed to the manifest
    reader.py     a committed cache with plain pyarrow or as a Ray Dataset; the held-out split by key hash
    encoders.py   the frozen encoders whose outputs it holds, and their fingerprints

Layout:
    <cache>/manifest.json                      the commit point: only files it lists are part of the cache
    <cache>/data/wave-<id>/<name>.parquet      written by one wave of source shards
"""
