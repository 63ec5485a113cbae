"""The `wuerstchen` command: one subcommand per job (each is also `python -m pipelines.<job>`), and
what every job's main() shares: its argument parser (whose --help says what the job does and lists
its exit codes), the logging setup, and the mapping of errors to exit codes."""

import argparse
import importlib
import logging
import sys
import textwrap
import traceback
from collections.abc import Callable

from core.ray_cluster import quiet_console

# subcommand -> (module under pipelines/, one-line help)
COMMANDS = {
    "demo": ("demo", "run the main job on embedded defaults"),
    "demo-decoders": ("demo_decoders", "train the demo's decoders (Stage A, then Stage B) on Twemoji into weights/"),
    "prep": ("prep", "filter image-text pairs and encode them into the latent cache"),
    "train": ("train", "train Stage C (or Stage B: model.stage=b; Stage A: model.stage=a) on the cache with Ray Train, tracked in MLflow"),
    "evaluate": ("evaluate", "compute the held-out validation loss of a registered Stage C version"),
    "register": ("register", "register a trained Stage C (or a decoder bundle) in the MLflow model registry"),
    "promote": ("promote", "move the champion alias to a better challenger, or roll it back"),
    "export": ("export", "write a registered version as a diffusers pipeline folder"),
    "retrain": ("retrain", "the scheduled retraining workflow: new shards -> prep -> fine-tune -> gate"),
    "convert": ("convert", "convert an original .pt checkpoint into a diffusers-format folder"),
    "flavors": ("flavors", "list the named model sizes and their parameter counts"),
    "plan": ("plan", "the memory per GPU a train config's run needs, and whether it fits"),
}

# The exit codes every job shares (retrain adds 4 and 5, for its lease); a scheduler or a Ray job's
# status sees them.
DONE, FAILED, BAD_INPUT = 0, 1, 2
# What every job reports as bad input, in one line and with BAD_INPUT: a config or storage error, a
# cache made by other encoders, a value the job refuses (all ValueErrors), a missing input file, an
# output that is in the way.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError)

# The packages whose INFO lines are the jobs' own output; every other logger (Ray's, MLflow's, ...)
# reaches the console with its warnings and errors only.
OWN_PACKAGES = ("core", "data_prep", "latent_cache", "pipelines", "stages")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def job_parser(job: str, doc: str, exit_codes: dict[int, str]) -> argparse.ArgumentParser:
    """The parser of `wuerstchen <job>`: --help shows the job's module docstring and its exit codes."""
    codes = "\n".join(textwrap.fill(meaning, 100, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
                      for code, meaning in sorted(exit_codes.items()))
    return argparse.ArgumentParser(prog=f"wuerstchen {job}", description=doc.strip(), epilog=f"exit codes:\n{codes}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, example: str) -> None:
    """The command line of the jobs that read a config (`core.config.load(cls, args.config, args.overrides)`)."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one setting, e.g. --set {example} (repeatable)")


def setup_logging(own_level: int = logging.INFO) -> None:
    """The jobs' own lines (at `own_level` and up) and everyone's warnings on stderr; Ray's internal
    lines in its log files."""
    quiet_console()
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for name in OWN_PACKAGES:
        logging.getLogger(name).setLevel(own_level)


def run_job(job: str, work: Callable[[], int | None], errors: dict[type[Exception], int] | None = None,
            own_level: int = logging.INFO) -> int:
    """Runs a job's work with logging set up (see setup_logging) and returns its exit code: what
    `work` returns (None is DONE); for an error listed in `errors` (the job's own) or in
    BAD_INPUT_ERRORS, its code and one line `wuerstchen <job>: <message>` on stderr; for any other
    error, its traceback and FAILED."""
    setup_logging(own_level)
    codes = {**(errors or {}), **dict.fromkeys(BAD_INPUT_ERRORS, BAD_INPUT)}  # the job's own first: more specific
    try:
        code = work()
    except Exception as err:  # noqa: BLE001 - every failure becomes an exit code
        code = next((code for kind, code in codes.items() if isinstance(err, kind)), None)
        if code is None:
            traceback.print_exc()
            first_line = (str(err).strip().splitlines() or [""])[0]
            print(f"wuerstchen {job}: failed: {type(err).__name__}: {first_line}", file=sys.stderr, flush=True)
            return FAILED
        print(f"wuerstchen {job}: {err}", file=sys.stderr, flush=True)
        return code
    return DONE if code is None else code


def _usage() -> str:
    lines = ["usage: wuerstchen COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`wuerstchen COMMAND --help` describes a command, its arguments and its exit codes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"wuerstchen: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipelines.{COMMANDS[argv[0]][0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
