"""`python -m pipelines.prep --config FILE [--set key=value ...]` / `wuerstchen prep ...`: read
image-text pairs, filter them with a counted funnel, and encode them once into the latent cache.

Rerunning the same command resumes: shards already in the cache's manifest are skipped, and new
shards of the source are appended. Exit codes: 0 done (also when there was nothing new), 2 bad
configuration, 1 any other failure.
"""

import sys

from data_prep.config import PrepConfig
from data_prep.runner import run_prep
from data_prep.summary import format_summary
from core.config import job_config


def main(argv: list[str] | None = None) -> int:
    cfg = job_config(PrepConfig, "wuerstchen prep", __doc__, argv,
                     "YAML file (see configs/); defaults: the bundled Twemoji set", "output.url=s3://bucket/cache")
    if cfg is None:
        return 2
    try:
        summary = run_prep(cfg, on_wave=lambda s: print(f"committed wave {s['waves']}: {s['rows_written']} rows so far", flush=True))
    except ValueError as err:  # configuration problems found while looking at the data or the cache
        print(f"wuerstchen prep: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
