"""`wuerstchen flavors`: the named sizes of every model, with parameter counts (built on the meta
device, so listing v2 allocates nothing)."""

import argparse
import sys

import torch

from stages import MODELS


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="wuerstchen flavors", description=__doc__.splitlines()[0]).parse_args(argv)
    for name, cls in MODELS.items():
        for flavor, config in cls.flavors.items():
            with torch.device("meta"):
                params = cls(config).num_parameters()
            print(f"{name:<20} {flavor:<6} {params:>14,}  {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
