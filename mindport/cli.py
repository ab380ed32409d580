"""The ``mindport`` command: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which
registers its arguments and sets ``func``. User-facing failures (config, checkpoint and
input errors) print one line ``mindport: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mindport {__import__('mindport').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"mindport.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mindport.ckpt_tools.safetensors_io import CheckpointError
    from mindport.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mindport: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
