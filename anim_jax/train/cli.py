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
            "in WORKDIR; SIGTERM/SIGINT save and stop. Exit codes: 0 finished; 75 stopped early with a checkpoint "
            "(SIGTERM/SIGINT, preemption): rerun to resume; 3 diverged (the message names the checkpoint to resume "
            "from); 4 data ran out; 2 bad config (checked before anything is built or written)."
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
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend tpu"
    from anim_jax.train import distributed

    distributed.maybe_initialize_distributed()  # before anything touches a JAX backend

    import jax

    from anim_jax import cli as main_cli
    from anim_jax import configlib
    from anim_jax.train.loop import STATUS_COMPLETED, STATUS_PREEMPTED

    from anim_jax.train.run import train

    cfg = configlib.load_config(args.config, getattr(args, "config_overrides", []))
    check_config(cfg)  # before building anything or writing into WORKDIR
    from anim_jax import storage

    if storage.is_url(args.workdir):
        storage.check_bucket(args.workdir, "--workdir")
    # A NonFiniteLossError (divergence) reaches anim_jax.cli.main: one line, EXIT_DIVERGED.
    result = train(cfg, args.workdir)
    if jax.process_count() > 1:
        # Leave together: with `srun --kill-on-bad-exit` a process exiting with a non-zero code
        # (EXIT_PREEMPTED) first could kill process 0 before it has committed the last checkpoint.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("anim-jax train: every process finished")
    print(f"anim-jax train: {result.status} at step {result.step} (last checkpoint: {result.last_checkpoint_step})")
    if result.status == STATUS_COMPLETED:
        return main_cli.EXIT_OK
    if result.status == STATUS_PREEMPTED:
        print(f"anim-jax train: stopped early with a checkpoint at step {result.last_checkpoint_step}: rerun the same "
              f"command to resume (exit code {main_cli.EXIT_PREEMPTED})", file=sys.stderr)
        return main_cli.EXIT_PREEMPTED
    return main_cli.EXIT_DATA_EXHAUSTED


def check_config(cfg) -> None:
    """What can be checked of a training config without building a model or touching WORKDIR:
    the stage, the dataset and init paths, step counts, the mesh size, the optimizer settings and
    the component geometry. Raises ``configlib.ConfigError`` naming the field."""
    import jax

    from anim_jax import storage
    from anim_jax.configlib import ConfigError
    from anim_jax.train import optim
    from anim_jax.train.architecture import component_configs
    from anim_jax.train.setup import xla_options

    if cfg.get("stage") not in (1, 2):
        raise ConfigError(f"config.stage must be 1 or 2, got {cfg.get('stage')!r}")
    dataset = cfg.data.get("dataset", "")
    if not dataset:
        raise ConfigError("config.data.dataset is not set: pass --config.data.dataset=DIR "
                          "(a dataset from `anim-jax prepare` or `anim-jax make-synthetic`)")
    if not storage.as_path(dataset).is_dir():
        raise ConfigError(f"config.data.dataset {str(dataset)!r} is not a directory")
    for field in ("weights_dir", "controlnet", "stage1_checkpoint", "motion_modules"):
        path = cfg.init.get(field, "")
        if path and not storage.as_path(path).exists():
            raise ConfigError(f"config.init.{field} {str(path)!r} does not exist")
    tc = cfg.train
    for field, low in (("num_steps", 0), ("save_every", 0), ("log_every", 1), ("max_to_keep", 1)):
        if int(tc.get(field, low)) < low:
            raise ConfigError(f"config.train.{field} must be >= {low}, got {tc.get(field)}")
    if int(cfg.validation.get("every", 0)) < 0:
        raise ConfigError(f"config.validation.every must be >= 0, got {cfg.validation.every}")
    n = int(cfg.mesh.get("num_devices", 0) or 0)
    if not 0 <= n <= jax.device_count():
        raise ConfigError(f"config.mesh.num_devices={n}: must be 0 (all) or 1..{jax.device_count()} (the devices present)")
    if float(cfg.optimizer.get("lr", 0.0)) < 0:
        raise ConfigError(f"config.optimizer.lr must be >= 0, got {cfg.optimizer.lr}")
    try:
        optim.make_optimizer(cfg.optimizer)
        component_configs(cfg)
        xla_options(tc.get("xla_options", ""))
    except ValueError as e:  # both name the config field at fault
        raise ConfigError(str(e)) from e
    from anim_jax.train.architecture import build_model
    from anim_jax.train.stages import trainable_filter

    try:  # the trainable set against the model's parameter paths (shapes only: nothing is allocated)
        trainable_filter(build_model(cfg, abstract=True), cfg.trainable.include, cfg.trainable.get("exclude", ()))
    except ValueError as e:
        raise ConfigError(str(e)) from e




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
