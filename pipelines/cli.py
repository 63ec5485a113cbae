"""The `wuerstchen` command: one subcommand per job (each is also `python -m pipelines.<job>`)."""

import importlib
import sys

# subcommand -> (module under pipelines/, one-line help)
COMMANDS = {
    "demo": ("demo", "run the main job on embedded defaults"),
    "prep": ("prep", "filter image-text pairs and encode them into the latent cache"),
    "train": ("train", "train Stage C on the latent cache with Ray Train, tracked in MLflow"),
    "evaluate": ("evaluate", "compute the held-out validation loss of a registered Stage C version"),
    "register": ("register", "register a trained Stage C (or a decoder bundle) in the MLflow model registry"),
    "promote": ("promote", "move the champion alias to a better challenger, or roll it back"),
    "export": ("export", "write a registered version as a diffusers pipeline folder"),
    "retrain": ("retrain", "the scheduled retraining workflow: new shards -> prep -> fine-tune -> gate"),
    "convert": ("convert", "convert an original .pt checkpoint into a diffusers-format folder"),
    "flavors": ("flavors", "list the named model sizes and their parameter counts"),
}


def _usage() -> str:
    lines = ["usage: wuerstchen COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`wuerstchen COMMAND --help` describes a command's arguments."]
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
