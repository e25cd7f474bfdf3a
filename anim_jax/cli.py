"""The ``anim-jax`` command line.

Each subcommand lives beside the code it runs; its module contributes a function that adds the
subparser and sets ``func``. Heavy imports happen inside ``func``, so ``anim-jax --help`` is fast.

Failures a user can act on are reported here, in one place, as one line on stderr with a distinct
exit code (``EXIT_CODES``); ``--debug`` (or ``ANIM_JAX_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from anim_jax import __version__, compile_cache

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
    ("anim_jax.serve", "add_serve_parser"),
)


# Exit codes (documented in the README; launch/slurm_gpu.sbatch requeues on EXIT_PREEMPTED).
EXIT_OK = 0  # finished
EXIT_FAILURE = 1  # an unexpected error (a bug, or the environment): the traceback is printed
EXIT_USAGE = 2  # bad arguments, config, input or output path: nothing was done or written
EXIT_DIVERGED = 3  # training stopped on a non-finite loss or state; the message names the checkpoint to resume
EXIT_DATA_EXHAUSTED = 4  # training data ran out before train.num_steps; a checkpoint was saved
EXIT_PREEMPTED = 75  # training stopped by SIGTERM/SIGINT or preemption, checkpoint saved: rerun to resume
#                      (75 is EX_TEMPFAIL of sysexits.h: "temporary failure, retry later")
EXIT_CODES = {
    EXIT_OK: "finished",
    EXIT_FAILURE: "unexpected error (traceback printed)",
    EXIT_USAGE: "bad arguments, config, input or output path (nothing done)",
    EXIT_DIVERGED: "training diverged (non-finite loss/state); resume from the checkpoint named",
    EXIT_DATA_EXHAUSTED: "training data ran out before num_steps (checkpoint saved)",
    EXIT_PREEMPTED: "training preempted (checkpoint saved): rerun the same command to resume",
}

# Errors that mean "fix the input", by qualified class name (matched along the exception's MRO, so
# nothing here imports the modules, and --help stays fast): one line, EXIT_USAGE.
_USAGE_ERRORS = frozenset({
    "anim_jax.configlib.ConfigError",
    "anim_jax.media.InputError",
    "anim_jax.convert.readers.CheckpointError",
    "anim_jax.convert.mapping.CheckpointMismatchError",
    "data_pipelines.video_io.EmptyVideoError",
    "builtins.FileNotFoundError",
    "builtins.FileExistsError",
    "builtins.IsADirectoryError",
    "builtins.NotADirectoryError",
    "builtins.PermissionError",
})
_DIVERGED_ERRORS = frozenset({"anim_jax.train.loop.NonFiniteLossError"})


def _matches(exc: BaseException, names: frozenset) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in names for c in type(exc).__mro__)


def debug_enabled() -> bool:
    return os.environ.get("ANIM_JAX_DEBUG", "").lower() not in ("", "0", "false", "no")


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.strerror or text}: {exc.filename}"
    return " ".join(text.split()) or type(exc).__name__  # one line, whatever the exception holds


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code ``main`` reports ``exc`` with, or None for an unexpected error (traceback)."""
    if _matches(exc, _DIVERGED_ERRORS):
        return EXIT_DIVERGED
    if _matches(exc, _USAGE_ERRORS):
        return EXIT_USAGE
    return None


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage summary is one --help away)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="anim-jax",
        description="Animate Anyone in JAX: convert PyTorch checkpoints, prepare data, train, animate.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"anim-jax {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of one line (also: ANIM_JAX_DEBUG=1)")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="do not keep compiled XLA programs on disk for the next run (default: kept in "
                             "$XDG_CACHE_HOME/anim_jax/xla, i.e. ~/.cache/anim_jax/xla; also: "
                             "ANIM_JAX_COMPILATION_CACHE=0, or =DIR for another folder)")
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
    if "jax" not in sys.modules:  # a caller that already imported jax keeps its own configuration
        compile_cache.configure(args.no_compilation_cache)
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # noqa: BLE001 - reported below; unknown errors are re-raised
        code = exit_code_for(e)
        if code is None or args.debug or debug_enabled():
            raise
        print(f"anim-jax {args.command}: error: {_message(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
