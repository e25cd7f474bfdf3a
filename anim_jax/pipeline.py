"""``AnimatePipeline``: reference image + pose frames -> video (Animate Anyone inference).

Host I/O around the one sampler (``anim_jax.diffusion.sampling.sample``), following
Moore-AnimateAnyone's ``Pose2VideoPipeline`` (pipeline_pose2vid_long.py):

* the reference image, LANCZOS-resized to the output size (-> VAE mean -> ReferenceNet), and
  squash-resized to the CLIP size (-> the cross-attention token);
* the pose frames, LANCZOS-resized, in [0, 1] (-> PoseGuider);
* the noise from ``seed`` (or given ``latents``), the context windows, then ``sample``: DDIM with
  classifier-free guidance over overlapping windows, one jitted program;
* the latents decoded in batches of ``decode_batch_size`` and rounded to uint8 (the original
  truncates).

All windows of a step are denoised in one batched call (sharded over the mesh, so N devices take N
windows), and the whole sampling loop is one jitted ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from anim_jax import media, parallel
from anim_jax.diffusion import NoiseSchedule, moore_inference_schedule
from anim_jax.diffusion import sampling
from anim_jax.diffusion.windows import windows_array
from anim_jax.models.animate_anyone import COMPONENTS, AnimateAnyone
from anim_jax.models.clip import clip_resize


@dataclasses.dataclass
class AnimateOutput:
    frames: np.ndarray | None  # (F, H, W, 3) uint8
    latents: np.ndarray | None  # (F, h, w, C) float32, scaled latents
    reference: np.ndarray  # (H, W, 3) uint8, the resized reference image
    poses: np.ndarray  # (F, H, W, 3) uint8, the resized pose frames
    fps: float | None


class AnimatePipeline:
    """``AnimatePipeline(model=AnimateAnyone(...))`` or ``AnimatePipeline(denoiser=..., reference_net=...,
    pose_guider=..., vae=..., image_encoder=...)``; ``schedule`` (default Moore's inference schedule)
    and ``mesh`` may be changed between calls: every call compiles for what it is given.
    ``batch_guidance``: conditional and unconditional branch in one denoiser call (see
    benchmarks/RESULTS.md)."""

    def __init__(
        self,
        *,
        model: AnimateAnyone | None = None,
        schedule: NoiseSchedule | None = None,
        mesh: jax.sharding.Mesh | None = None,
        decode_batch_size: int = 8,
        batch_guidance: bool = True,
        **components,
    ):
        if model is None:
            missing = sorted(set(COMPONENTS) - set(components))
            unknown = sorted(set(components) - set(COMPONENTS))
            if missing or unknown:
                raise TypeError(f"AnimatePipeline needs model= or all of {list(COMPONENTS)} (missing {missing}, unknown {unknown})")
            model = AnimateAnyone(**components)
        elif components:
            raise TypeError("AnimatePipeline takes model= or the five components, not both")
        self.model = model
        self.schedule = schedule or moore_inference_schedule()
        self.mesh = mesh
        self.decode_batch_size = decode_batch_size
        self.batch_guidance = batch_guidance
        self._bar = None
        self._on_step = None

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        directory,
        *,
        dtype=jnp.float32,
        attention=None,
        mesh: jax.sharding.Mesh | None = None,
        rules=parallel.DEFAULT_RULES,
        **kwargs,
    ) -> "AnimatePipeline":
        """Loads a converted-weights directory (``anim-jax convert``). With a mesh, parameters are
        placed by the rules table (replicated where a dim does not divide)."""
        from anim_jax.convert.components import load_components

        components = load_components(directory, dtype=dtype, attention=attention)
        schedule = components.pop("schedule")
        model = AnimateAnyone(**components)
        if mesh is not None:
            parallel.shard_model(model, mesh, rules)
        return cls(model=model, schedule=schedule, mesh=mesh, **kwargs)

    # ------------------------------------------------------------------------------ properties

    # The networks, by name (``pipe.denoiser`` ...): the model's, not copies.
    denoiser = property(lambda self: self.model.denoiser)
    reference_net = property(lambda self: self.model.reference_net)
    pose_guider = property(lambda self: self.model.pose_guider)
    vae = property(lambda self: self.model.vae)
    image_encoder = property(lambda self: self.model.image_encoder)

    @property
    def latent_scale(self) -> float:
        return self.model.latent_scale

    @property
    def vae_downscale(self) -> int:
        return self.model.latent_downscale

    @property
    def max_window(self) -> int | None:
        return self.model.max_window

    # One bound method as the sampler's callback for every call (it is a static argument of the
    # jitted sampler), so a changing per-call ``on_step`` does not recompile.
    def _tick(self, i):
        if self._bar is not None:
            self._bar.update(1)
        if self._on_step is not None:
            self._on_step(int(i))

    # ------------------------------------------------------------------------------ the call

    def __call__(
        self,
        reference_image,
        pose_frames,
        *,
        width: int,
        height: int,
        num_frames: int | None = None,
        steps: int = 25,
        guidance_scale: float = 3.5,
        seed: int = 42,
        latents: np.ndarray | None = None,
        context_frames: int = 24,
        context_overlap: int = 4,
        closed_loop: bool = True,
        output_type: str = "frames",
        progress: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> AnimateOutput:
        """``on_step(i)``: called on the host after DDIM step ``i`` (0-based), e.g. to drive a
        progress display other than the terminal bar of ``progress``."""
        factor = self.vae_downscale
        if width % factor or height % factor or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {factor}, got {width}x{height}")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 0):  # negative: away from the reference
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        if output_type not in ("frames", "latents", "both"):
            raise ValueError(f"output_type must be 'frames', 'latents' or 'both', got {output_type!r}")
        reference = media.to_rgb_image(reference_image, name="reference image")
        poses, fps = media.load_pose_frames(pose_frames)
        if num_frames is None:
            num_frames = len(poses)
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_frames > len(poses):
            raise ValueError(f"{num_frames} frames were requested but only {len(poses)} pose frames were given")
        window = min(context_frames, num_frames)
        if self.max_window is not None and window > self.max_window:
            raise ValueError(
                f"context window of {window} frames is longer than the motion module's position encoding "
                f"({self.max_window} frames); use --context-frames <= {self.max_window}"
            )
        poses = poses[:num_frames]
        ref_pixels = media.resize_lanczos(reference, width, height)
        pose_pixels = np.stack([media.resize_lanczos(p, width, height) for p in poses])

        h, w = height // factor, width // factor
        channels = self.model.latent_channels
        if latents is None:
            x = jax.random.normal(jax.random.key(seed), (num_frames, h, w, channels), jnp.float32)
        else:
            x = jnp.asarray(latents, jnp.float32)
            if x.shape != (num_frames, h, w, channels):
                raise ValueError(f"latents have shape {x.shape}; expected {(num_frames, h, w, channels)}")

        windows = windows_array(num_frames, context_frames, context_overlap, closed_loop)
        self._bar = _progress_bar(steps, progress)
        self._on_step = on_step
        try:
            x = sampling.sample(
                self.model, x[None], reference=(ref_pixels.astype(np.float32) / 127.5 - 1.0)[None],
                clip=clip_resize(reference, self.model.clip_size), poses=(pose_pixels.astype(np.float32) / 255.0)[None],
                schedule=self.schedule, steps=steps, guidance_scale=guidance_scale, windows=windows, mesh=self.mesh,
                batch_guidance=self.batch_guidance, callback=self._tick if (progress or on_step is not None) else None,
            )[0]
            x = jax.block_until_ready(x)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._on_step = None
        frames = sampling.decode_frames(self.model, x, self.decode_batch_size) if output_type in ("frames", "both") else None
        lat = np.asarray(x) if output_type in ("latents", "both") else None
        return AnimateOutput(frames=frames, latents=lat, reference=ref_pixels, poses=pose_pixels, fps=fps)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step")
