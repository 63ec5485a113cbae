"""`python -m pipelines.prep --config FILE [--set key=value ...]` / `wuerstchen prep ...`: read
image-text pairs, filter them with a counted funnel, and encode them once into the latent cache.

Rerunning the same command resumes: shards already in the cache's manifest are skipped, and new
shards of the source are appended.
"""

import sys

from data_prep.config import PrepConfig
from data_prep.runner import run_prep
from data_prep.summary import format_summary
from core.config import load
from pipelines.cli import add_config_arguments, job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("prep", __doc__, {
        0: "done (also when no shard was new)",
        1: "any other failure",
        2: "bad configuration: an unknown key, a threshold on a column the source lacks, a cache made by "
           "other encoders, a storage error (missing bucket, access denied)",
    })
    add_config_arguments(parser, "YAML file (see configs/); defaults: the bundled Twemoji set", "output.url=s3://bucket/cache")
    args = parser.parse_args(argv)

    def prep() -> None:
        cfg = load(PrepConfig, args.config, args.overrides)
        summary = run_prep(cfg, on_wave=lambda s: print(f"committed wave {s['waves']}: {s['rows_written']} rows so far", flush=True))
        print(format_summary(summary), flush=True)

    return run_job("prep", prep)


if __name__ == "__main__":
    sys.exit(main())
