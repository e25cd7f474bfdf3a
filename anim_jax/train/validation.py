"""Validation samples during training: the one sampler (``diffusion.sampling.sample``) on fixed
inputs from the dataset, with the current weights."""

from __future__ import annotations

import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from anim_jax import media
from anim_jax.diffusion import NoiseSchedule, sampling
from anim_jax.models.animate_anyone import AnimateAnyone
from anim_jax.train.data import data_config
from anim_jax.train.schedules import validation_schedule
from data_pipelines.grain_pipeline import make_map_dataset, normalize_batch

log = logging.getLogger("anim_jax.train")


def latent_noise(model: AnimateAnyone, key, batch: int, frames: int, height: int, width: int) -> jax.Array:
    """Standard normal latents (B, F, h, w, C) for images of ``height`` x ``width``."""
    d = model.latent_downscale
    return jax.random.normal(key, (batch, frames, height // d, width // d, model.latent_channels), jnp.float32)


def sample_videos(model: AnimateAnyone, reference, clip, poses, key, *, schedule: NoiseSchedule, num_steps: int,
                  guidance_scale: float) -> jax.Array:
    """``reference`` (B, H, W, 3) in [-1, 1], ``clip`` (B, S, S, 3) uint8, ``poses`` (B, F, H, W, 3)
    in [0, 1] -> frames (B, F, H, W, 3) in [0, 1]: ``sampling.sample`` with noise from ``key`` and
    one window of all F frames."""
    b, f, h, w = poses.shape[:4]
    return sampling.sample(model, latent_noise(model, key, b, f, h, w), reference=reference, clip=clip, poses=poses,
                           schedule=schedule, steps=num_steps, guidance_scale=guidance_scale, decode=True)


def validation_inputs(cfg, n: int, num_frames: int) -> dict[str, np.ndarray]:
    """``n`` fixed elements of the dataset (another seed than training) as one video batch:
    ``frames`` (n, F, H, W, 3) and ``reference`` in [-1, 1], ``poses`` in [0, 1], ``clip`` uint8."""
    dc = data_config(cfg, n, seed_offset=1, batch_size=n)
    # Every process builds the same inputs (the whole dataset is visible to each).
    ds = make_map_dataset(dc, process_index=0, process_count=1, batch=False)
    elements = [normalize_batch(ds[i]) for i in range(n)]
    stack = lambda k: np.stack([np.asarray(e[k]) for e in elements])
    if "target" in elements[0]:  # single-frame data (stage 1): a clip of one frame
        frames, poses = stack("target")[:, None], stack("pose")[:, None]
    else:
        frames, poses = stack("frames")[:, :num_frames], stack("poses")[:, :num_frames]
    return dict(frames=frames, poses=poses, reference=stack("reference"), clip=stack("clip"))


class Validator:
    """Every ``validation.every`` steps: a small DDIM sampling (CFG, ``num_inference_steps``) with the
    current weights on fixed inputs from the dataset; writes ``[reference | pose | sample | ground
    truth]`` per row as a TensorBoard GIF and ``WORKDIR/validation/step_<N>.mp4``."""

    def __init__(self, cfg, trainer, workdir: pathlib.Path, writer):
        v = cfg.validation
        self.every = int(v.every)
        self.trainer, self.writer = trainer, writer
        self.out_dir = workdir / "validation"
        self.fps = float(v.fps)
        inputs = validation_inputs(cfg, int(v.num_samples), int(v.num_frames))
        self.frames, self.poses, self.reference, self.clip = (inputs[k] for k in ("frames", "poses", "reference", "clip"))
        self.schedule = validation_schedule(str(v.beta_schedule), cfg)
        self.steps, self.guidance_scale = int(v.num_inference_steps), float(v.guidance_scale)
        rep = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
        self._put = lambda x: jax.device_put(jnp.asarray(x), rep)
        b, f, h, w = self.poses.shape[:4]
        self.noise = self._put(latent_noise(trainer.state.model(), jax.random.key(int(v.seed)), b, f, h, w))

    def __call__(self, step: int, state) -> str | None:
        t0 = time.perf_counter()
        out = sampling.sample(state.model(), self.noise, reference=self._put(self.reference), clip=self._put(self.clip),
                              poses=self._put(self.poses), schedule=self.schedule, steps=self.steps,
                              guidance_scale=self.guidance_scale, decode=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
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
