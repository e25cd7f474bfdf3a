"""``anim-jax train``: Animate Anyone stage 1 or 2 from a config file, into a work directory.

    anim-jax train --config configs/stage1.py --workdir runs/s1 --config.data.dataset=data/ubc \\
        --config.init.weights_dir=weights/sd15_init --config.init.controlnet=weights/control_openpose
    anim-jax train --config configs/stage2.py --workdir runs/s2 --config.data.dataset=data/ubc \\
        --config.init.weights_dir=runs/s1/export --config.init.motion_modules=weights/mm_sd_v15_v2.ckpt
    anim-jax train --config configs/stage1.py:tiny --workdir /tmp/s1 --config.data.dataset=/tmp/synthetic

Work directory::

    WORKDIR/config.json           the resolved config (process 0)
    WORKDIR/checkpoints/<step>/   Orbax: train state, data-iterator state, metadata (resumed from automatically)
    WORKDIR/logs/                 TensorBoard event file: loss, loss_t/*, grad_norm, lr, step_time,
                                  examples_per_sec, mfu; validation videos (GIF) under logs/videos/
    WORKDIR/validation/           the validation samples as mp4
    WORKDIR/export/               at the end: a converted-weights directory of the trained model (the next
                                  stage's init.weights_dir, or anim-jax animate --weights)

Order of start-up: ``jax.distributed`` (multi-host, from the environment) -> config -> mesh -> model
and train state -> data -> checkpoint manager (resume) -> loop. MFU: the step's model FLOPs come from
XLA's cost analysis of the lowered step (without remat); see ``animate_anyone.step_flops``.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time

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

    cfg = configlib.load_config(args.config, getattr(args, "config_overrides", []))
    check_config(cfg)  # before building anything or writing into WORKDIR
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

    from anim_jax.configlib import ConfigError
    from anim_jax.train import animate_anyone as aa
    from anim_jax.train import optim

    if cfg.get("stage") not in (1, 2):
        raise ConfigError(f"config.stage must be 1 or 2, got {cfg.get('stage')!r}")
    dataset = cfg.data.get("dataset", "")
    if not dataset:
        raise ConfigError("config.data.dataset is not set: pass --config.data.dataset=DIR "
                          "(a dataset from `anim-jax prepare` or `anim-jax make-synthetic`)")
    if not pathlib.Path(dataset).is_dir():
        raise ConfigError(f"config.data.dataset {str(dataset)!r} is not a directory")
    for field in ("weights_dir", "controlnet", "stage1_checkpoint", "motion_modules"):
        path = cfg.init.get(field, "")
        if path and not pathlib.Path(path).exists():
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
        aa.component_configs(cfg)
    except ValueError as e:  # both name the config field at fault
        raise ConfigError(str(e)) from e


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def data_config(cfg, global_batch: int, *, seed_offset: int = 0, batch_size: int | None = None):
    from data_pipelines.grain_pipeline import data_config as make

    d = cfg.data
    if not d.dataset:
        raise ValueError("config.data.dataset is not set: pass --config.data.dataset=DIR (a dataset from `anim-jax prepare`)")
    return make(
        path=str(d.dataset), stage=int(cfg.stage), resolution=tuple(d.resolution), sample_margin=int(d.sample_margin),
        n_frames=int(d.n_frames), sample_rate=int(d.sample_rate), clip_size=int(d.clip_size),
        seed=int(d.seed) + seed_offset, batch_size=int(batch_size or global_batch), num_workers=int(d.num_workers),
        read_threads=int(d.read_threads), prefetch=int(d.prefetch), uint8_output=bool(d.uint8_output),
        crop_scale=d.get("crop_scale", None),
    )


class DeviceBatches:
    """This host's Grain batches as global, sharded ``jax.Array``s (without ``index``);
    ``get_state``/``set_state`` are Grain's, so the checkpoint holds the position."""

    def __init__(self, cfg, trainer):
        from data_pipelines.grain_pipeline import make_iter_dataset

        self.trainer = trainer
        self._it = iter(make_iter_dataset(data_config(cfg, trainer.global_batch_size)))

    def __iter__(self):
        return self

    def __next__(self):
        return self.trainer.put_batch(next(self._it))

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)

    def close(self):
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class Validator:
    """Every ``validation.every`` steps: a small DDIM sampling (CFG, ``num_inference_steps``) with the
    current weights on fixed inputs from the dataset; writes ``[reference | pose | sample | ground
    truth]`` per row as a TensorBoard GIF and ``WORKDIR/validation/step_<N>.mp4``."""

    def __init__(self, cfg, trainer, workdir: pathlib.Path, writer):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from anim_jax.train import animate_anyone as aa
        from data_pipelines.grain_pipeline import make_map_dataset

        v = cfg.validation
        self.every = int(v.every)
        self.cfg, self.trainer, self.writer = cfg, trainer, writer
        self.out_dir = workdir / "validation"
        self.fps = float(v.fps)
        n = int(v.num_samples)
        dc = data_config(cfg, n, seed_offset=1, batch_size=n)
        # Every process builds the same inputs (the whole dataset is visible to each).
        ds = make_map_dataset(dc, process_index=0, process_count=1, batch=False)
        elements = [ds[i] for i in range(n)]
        stack = lambda k: np.stack([e[k] for e in elements])
        if cfg.stage == 1:
            frames, poses = stack("target")[:, None], stack("pose")[:, None]
        else:
            f = int(v.num_frames)
            frames, poses = stack("frames")[:, :f], stack("poses")[:, :f]
        to_float = lambda x, signed: (x.astype(np.float32) / 255.0 * (2.0 if signed else 1.0) - (1.0 if signed else 0.0)) if x.dtype == np.uint8 else x
        self.frames = to_float(frames, True)
        self.poses = to_float(poses, False)
        self.reference = to_float(stack("reference"), True)
        self.clip = stack("clip")
        schedule = aa.validation_schedule(str(v.beta_schedule), cfg)
        steps, scale = int(v.num_inference_steps), float(v.guidance_scale)
        graphdef = trainer.state.graphdef
        self.key = jax.random.key(int(v.seed))

        def run(params, frozen, reference, clip, poses, key):
            model = nnx.merge(graphdef, params, frozen)
            return aa.sample_videos(model, reference, clip, poses, key, schedule=schedule, num_steps=steps,
                                    guidance_scale=scale)

        rep = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
        shard = lambda t: jax.tree.map(lambda x: x.sharding, t)
        self._run = jax.jit(run, in_shardings=(shard(trainer.state.params), shard(trainer.state.frozen), rep, rep, rep, rep),
                            out_shardings=rep)
        self._put = lambda x: jax.device_put(jnp.asarray(x), rep)

    def __call__(self, step: int, state) -> str | None:
        import jax
        import numpy as np

        from anim_jax import media

        t0 = time.perf_counter()
        out = self._run(state.params, state.frozen, self._put(self.reference), self._put(self.clip),
                        self._put(self.poses), self.key)
        samples = np.asarray(jax.device_get(out))  # (N, F, H, W, 3) in [0, 1]
        if jax.process_index() != 0:
            return None
        u8 = lambda x: (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        rows = []
        for i in range(samples.shape[0]):
            rows.append(media.side_by_side([u8(self.reference[i] * 0.5 + 0.5), u8(self.poses[i]), u8(samples[i]),
                                            u8(self.frames[i] * 0.5 + 0.5)]))
        video = np.concatenate(rows, axis=1)  # (F, N*H, 4*W+pad, 3)
        if self.writer is not None:
            self.writer.write_video(step, "validation", list(video), fps=self.fps)
        path = self.out_dir / f"step_{step:08d}.mp4"
        media.write_mp4(path, video, fps=self.fps)
        log.info("validation samples at step %d: %s (%.1fs)", step, path, time.perf_counter() - t0)
        return str(path)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _write_config(cfg, workdir: pathlib.Path) -> None:
    from anim_jax.convert.store import atomic_write

    text = cfg.to_json_best_effort(indent=2, sort_keys=True)
    atomic_write(workdir / "config.json", lambda tmp: pathlib.Path(tmp).write_text(text))


def export(state, workdir: pathlib.Path, name: str = "export", *, stage: int | None = None, cfg=None) -> pathlib.Path:
    """The trained model (trained and frozen parts) as a converted-weights directory
    (``models.factory.save_components``, float32) with the inference schedule of ``cfg.diffusion``,
    written by process 0. Every process must call it: with several processes the parameters are
    gathered collectively first."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from anim_jax.models import factory
    from anim_jax.train import animate_anyone as aa

    out = workdir / name
    model = state.model()
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        pure = multihost_utils.process_allgather(pure, tiled=True)
    else:
        pure = jax.device_get(pure)
    pure = jax.tree.map(lambda x: np.asarray(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x), pure)
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    if jax.process_index() == 0:
        factory.save_components(out, model.components(), schedule=aa.export_schedule(cfg),
                                extra={"source": "anim-jax train", "stage": stage, "step": int(jax.device_get(state.step))})
    return out


def train(cfg, workdir) -> "object":
    """One training run (see the module docstring); returns the loop's ``LoopResult``."""
    import jax

    from anim_jax.checkpoint import CheckpointManager
    from anim_jax.train import animate_anyone as aa
    from anim_jax.train import metrics as metrics_lib
    from anim_jax.train.loop import STATUS_COMPLETED, train_loop

    workdir = pathlib.Path(workdir).absolute()
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, workdir)
    t0 = time.perf_counter()
    trainer = aa.setup(cfg)
    log.info("stage %d: %d trainable / %d frozen parameters, global batch %d on mesh %s (%.1fs)", int(cfg.stage),
             _count(trainer.state.params), _count(trainer.state.frozen), trainer.global_batch_size,
             dict(trainer.mesh.shape), time.perf_counter() - t0)
    tc = cfg.train
    flops = None
    if tc.get("compute_flops", True):
        flops = count_step_flops(trainer, cfg)
    step_fn = trainer.train_step

    data = DeviceBatches(cfg, trainer)
    writer = metrics_lib.MetricWriter(workdir / "logs", enabled=is_main)
    validator = Validator(cfg, trainer, workdir, writer) if int(cfg.validation.every) > 0 else None
    latest = {}

    def step_and_keep(state, batch):
        state, metrics = step_fn(state, batch)
        latest["state"] = state  # valid until the next call donates it
        return state, metrics

    def on_step(step, metrics):
        if validator is not None and step % validator.every == 0:
            validator(step, latest["state"])

    loop_cfg = dict(global_batch_size=trainer.global_batch_size, flops_per_step=flops,
                    peak_flops_per_device=float(tc.get("peak_flops_per_device", 0.0)) or None)
    ckpt = CheckpointManager(workdir / "checkpoints", max_to_keep=int(tc.max_to_keep), async_save=bool(tc.async_save),
                             include_frozen=bool(tc.include_frozen))
    try:
        result = train_loop(
            loop_cfg, trainer.state, step_and_keep, data, ckpt, writer,
            num_steps=int(tc.num_steps), save_every=int(tc.save_every), log_every=int(tc.log_every),
            on_step=on_step, metadata={"stage": int(cfg.stage), "config": json.loads(cfg.to_json_best_effort())},
        )
    finally:
        ckpt.close()
        data.close()
        writer.close()
    if result.status == STATUS_COMPLETED and tc.get("export", True):
        path = export(result.state, workdir, stage=int(cfg.stage), cfg=cfg)
        log.info("exported the trained model to %s", path)
    return result


def count_step_flops(trainer, cfg) -> float | None:
    """``animate_anyone.step_flops``, or None with a warning saying why (MFU is then not reported):
    a FLOP count is a diagnostic and must not stop a training run."""
    from anim_jax.train import animate_anyone as aa

    t0 = time.perf_counter()
    try:
        flops = aa.step_flops(trainer, cfg)
    except Exception as e:  # noqa: BLE001 - any failure of the cost analysis only loses the MFU metric
        log.warning("counting the train step's FLOPs failed (%s: %s): MFU will not be reported", type(e).__name__, e)
        return None
    if not flops:
        log.warning("XLA's cost analysis gives no FLOP count on this backend: MFU will not be reported")
        return None
    log.info("model FLOPs per step (XLA cost analysis, no remat): %.4g (%.1fs)", flops, time.perf_counter() - t0)
    return flops


def _count(tree) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree))
