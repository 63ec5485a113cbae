"""`wuerstchen flavors`: the named sizes of every model, with parameter counts (built on the meta
device, so listing v2 allocates nothing)."""

import sys

import torch

from pipelines.cli import job_parser, run_job
from stages import MODELS


def main(argv: list[str] | None = None) -> int:
    job_parser("flavors", __doc__, {0: "listed", 1: "failed", 2: "bad arguments"}).parse_args(argv)

    def list_flavors() -> None:
        for name, cls in MODELS.items():
            for flavor, config in cls.flavors.items():
                with torch.device("meta"):
                    params = cls(config).num_parameters()
                print(f"{name:<20} {flavor:<6} {params:>14,}  {config}")

    return run_job("flavors", list_flavors)


if __name__ == "__main__":
    sys.exit(main())
