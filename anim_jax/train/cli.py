"""``anim-jax train``: Animate Anyone stage 1 or 2 from a config file, into a work directory.

    anim-jax train --config configs/stage1.py --workdir runs/s1 --config.data.dataset=data/ubc \\
        --config.init.weights_dir=weights/sd15_init --config.init.controlnet=weights/control_openpose
    anim-jax train --config configs/stage2.py --workdir runs/s2 --config.data.dataset=data/ubc \\
        --config.init.weights_dir=runs/s1/export --config.init.motion_modules=weights/mm_sd_v15_v2.ckpt
    anim-jax train --config configs/stage1.py:tiny --workdir /tmp/s1 --config.data.dataset=/tmp/synthetic

The run itself (work directory layout, start-up order) is ``anim_jax.train.run.train``; this
module parses arguments and maps failures to exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("anim_jax.train")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train Animate Anyone (stage 1: denoiser + ReferenceNet + PoseGuider; stage 2: motion modules)",
        description=(
            "Train from an ml_collections config file (configs/stage1.py, configs/stage2.py; ':tiny' selects the "
            "tiny CPU variant). Override any field with --config.<field>=<value>, e.g. --config.data.dataset=DIR "
            "--config.optimizer.lr=2e-5 --config.mesh.shape='(1,-1,1)'. Runs resume from the latest checkpoint "
            "in WORKDIR; SIGTERM/SIGINT save and stop."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE[:ARG]", help="config file, e.g. configs/stage1.py:tiny")
    p.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, logs, validation samples, export")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step by step
    from anim_jax.train import distributed

    distributed.maybe_initialize_distributed()  # before anything touches a JAX backend

    from anim_jax import configlib
    from anim_jax.train.loop import NonFiniteLossError

    from anim_jax.train.run import train

    cfg = configlib.load_config(args.config, getattr(args, "config_overrides", []))
    try:
        result = train(cfg, args.workdir)
    except NonFiniteLossError as e:
        print(f"anim-jax train: {e}", file=sys.stderr)
        return 3
    print(f"anim-jax train: {result.status} at step {result.step} (last checkpoint: {result.last_checkpoint_step})")
    return 0




def __getattr__(name):
    # The run logic lived here before anim_jax.train.run; old imports keep working.
    if name in ("train", "export"):
        from anim_jax.train import run

        return getattr(run, name)
    if name in ("data_config", "DeviceBatches"):
        from anim_jax.train import data

        return getattr(data, name)
    if name == "Validator":
        from anim_jax.train.validation import Validator

        return Validator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
