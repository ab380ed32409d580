"""The ``mindport`` command: one entry point, one subcommand per job.

Each subcommand is a module in :mod:`mindport.commands` exposing
``add_parser(subparsers)``, which registers its arguments and sets ``func``; modules are
discovered, so adding a subcommand touches no shared file. User-facing failures (config, checkpoint and
input errors) print one line ``mindport: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mindport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mindport {__import__('mindport').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from mindport import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"mindport.commands.{info.name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mindport.errors import CheckpointError, ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"mindport: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
