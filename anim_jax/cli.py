"""The ``anim-jax`` command line.

Each subcommand lives in the module that implements it and contributes two functions:
``add_parser(subparsers)`` and ``run(args)``. Modules are imported when their command runs, so
``anim-jax --help`` stays fast and never pulls in jax.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from anim_jax import __version__

# command name -> (module, one-line help). The module provides add_arguments(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anim-jax",
        description="Animate Anyone in JAX: convert PyTorch checkpoints, prepare data, train, animate.",
    )
    parser.add_argument("--version", action="version", version=f"anim-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --config.a.b=value overrides are collected separately (argparse cannot declare them upfront).
    overrides = [a for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    if args.command is None:
        parser.print_help()
        return 0
    args.config_overrides = overrides
    result = importlib.import_module(args._module).run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
