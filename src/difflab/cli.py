"""``difflab <command>``: a thin command line over the library.

Each command lives next to the code it drives and registers itself through ``register(subparsers)``;
this file only wires them together and turns ``DifflabError`` into a one-line message.
"""

from __future__ import annotations

import argparse
import sys

from difflab import __version__, demo
from difflab.app import cli as app_cli
from difflab.diffusion import cli as diffusion_cli
from difflab.errors import DifflabError
from difflab.models import cli as models_cli
from difflab.models import depth_cli, export_cli, instruct_cli, p2p_cli, vlm_cli
from difflab.world import cli as world_cli

# Modules that define a ``register(subparsers)`` function, in the order ``--help`` lists them.
COMMAND_MODULES = (demo, models_cli, p2p_cli, instruct_cli, depth_cli, vlm_cli, export_cli, world_cli, diffusion_cli,
                   app_cli)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflab",
        description=(
            "difflab: diffusion, CLIP and vision-language models from scratch, trained and measured "
            "on a procedural toy world. Run 'difflab COMMAND --help' for each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for input errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        # A command group ('difflab world') or no command at all: show what can be run.
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        return int(args.func(args) or 0)
    except DifflabError as err:
        if args.debug:
            raise
        code = getattr(err, "exit_code", 2)  # an interrupted training: 128 + the signal, not an error
        print(f"difflab: {'' if code != 2 else 'error: '}{err}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        # Ctrl-C outside a training (which saves and raises Interrupted): nothing half-written is left,
        # since every file difflab writes is written atomically.
        if args.debug:
            raise
        print("difflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
