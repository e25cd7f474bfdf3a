"""The ``anim-jax`` command line.

Each subcommand lives beside the code it runs; its module contributes a function that adds the
subparser and sets ``func``. Heavy imports happen inside ``func``, so ``anim-jax --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from anim_jax import __version__

# (module, function): each function adds one subcommand to the subparsers and sets ``func``.
# Modules keep jax out of their top level so ``--help`` is instant.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("data_pipelines.cli", "add_synthetic_parser"),
    ("data_pipelines.cli", "add_prepare_parser"),
    ("anim_jax.animate_cli", "add_animate_parser"),
    ("anim_jax.evaluate", "add_evaluate_parser"),
    ("anim_jax.metrics.cli", "add_convert_metric_parser"),
    ("anim_jax.convert.cli", "add_convert_parser"),
    ("anim_jax.convert.cli", "add_export_parser"),
    ("anim_jax.convert.dwpose_cli", "add_convert_pose_parser"),
    ("anim_jax.pose.cli", "add_pose_parser"),
    ("anim_jax.train.cli", "add_train_parser"),
    ("anim_jax.demo", "add_demo_parser"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anim-jax",
        description="Animate Anyone in JAX: convert PyTorch checkpoints, prepare data, train, animate.",
    )
    parser.add_argument("--version", action="version", version=f"anim-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, adder in COMMANDS:
        getattr(importlib.import_module(module), adder)(sub)
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
