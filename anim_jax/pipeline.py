"""``AnimatePipeline``: reference image + pose frames -> video (Animate Anyone inference).

The computation follows Moore-AnimateAnyone's ``Pose2VideoPipeline`` (pipeline_pose2vid_long.py):

* reference image --LANCZOS resize--> VAE mean x scaling --> ReferenceNet once (t = 0, conditional
  CLIP token) --> per-block reference tokens, projected to keys/values once per video;
* reference image --squash to the CLIP size--> CLIP image embedding: one cross-attention token;
  the unconditional branch uses a zero token and no reference attention;
* pose frames --LANCZOS resize, [0, 1]--> PoseGuider once for all frames;
* DDIM over overlapping context windows: every window's conditional and unconditional
  predictions are averaged over the windows covering a frame, then guided, then stepped.

Differences from the original, on purpose: all windows of a step are denoised in one batched call
(sharded over the mesh, so N devices take N windows), and the whole sampling loop is one jitted
``lax.scan``. Decoded frames are rounded to uint8 (the original truncates).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from anim_jax import media, parallel
from anim_jax.diffusion import NoiseSchedule, ddim_step, moore_inference_schedule
from anim_jax.diffusion.windows import windows_array
from anim_jax.models.clip import clip_preprocess


@dataclasses.dataclass
class AnimateOutput:
    frames: np.ndarray | None  # (F, H, W, 3) uint8
    latents: np.ndarray | None  # (F, h, w, C) float32, scaled latents
    reference: np.ndarray  # (H, W, 3) uint8, the resized reference image
    poses: np.ndarray  # (F, H, W, 3) uint8, the resized pose frames
    fps: float | None


def _split(module):
    graphdef, state = nnx.split(module)
    return graphdef, state


class AnimatePipeline:
    def __init__(
        self,
        *,
        denoiser,
        reference_net,
        pose_guider,
        vae,
        image_encoder,
        schedule: NoiseSchedule | None = None,
        mesh: jax.sharding.Mesh | None = None,
        decode_batch_size: int = 8,
    ):
        self.denoiser = denoiser
        self.reference_net = reference_net
        self.pose_guider = pose_guider
        self.vae = vae
        self.image_encoder = image_encoder
        self.schedule = schedule or moore_inference_schedule()
        self.mesh = mesh
        self.decode_batch_size = decode_batch_size
        self._compiled: dict[Any, Any] = {}
        self._bar = None

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
        from anim_jax.models import factory

        components = factory.load_components(directory, dtype=dtype, attention=attention)
        schedule = components.pop("schedule")
        if mesh is not None:
            for module in components.values():
                parallel.shard_model(module, mesh, rules)
        return cls(**components, schedule=schedule, mesh=mesh, **kwargs)

    # ------------------------------------------------------------------------------ properties

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def vae_downscale(self) -> int:
        return self.vae.config.downscale

    @property
    def max_window(self) -> int | None:
        motion = getattr(self.denoiser.config, "motion", None)
        return None if motion is None else int(motion.temporal_position_encoding_max_len)

    def _jit(self, key, fn):
        if key not in self._compiled:
            self._compiled[key] = jax.jit(fn)
        return self._compiled[key]

    # ------------------------------------------------------------------------------ stages

    def encode_reference(self, image: np.ndarray) -> jax.Array:
        """(H, W, 3) uint8 -> (1, h, w, C) scaled latent mean."""
        graphdef, state = _split(self.vae)
        scale = self.latent_scale

        def run(state, x):
            vae = nnx.merge(graphdef, state)
            mean, _ = vae.encode(x)
            return mean * scale

        x = jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0
        return self._jit("encode", run)(state, x)

    def clip_context(self, image: Image.Image) -> jax.Array:
        """The conditional cross-attention context (1, 1, D)."""
        size = self.image_encoder.config.image_size
        pixels = jnp.asarray(clip_preprocess(image, size))
        graphdef, state = _split(self.image_encoder)

        def run(state, pixels):
            return nnx.merge(graphdef, state)(pixels)[:, None, :]

        return self._jit("clip", run)(state, pixels)

    def reference_features(self, ref_latent: jax.Array, context: jax.Array):
        """ReferenceNet at t = 0 on the reference latent, projected to per-block keys/values."""
        ref_graph, ref_state = _split(self.reference_net)
        den_graph, den_state = _split(self.denoiser)

        def run(ref_state, den_state, latent, context):
            tokens = nnx.merge(ref_graph, ref_state)(latent, jnp.zeros((1,), jnp.int32), context)
            return nnx.merge(den_graph, den_state).reference_kv(tokens)

        return self._jit("reference", run)(ref_state, den_state, ref_latent, context)

    def pose_features(self, poses: np.ndarray) -> jax.Array:
        """(F, H, W, 3) uint8 -> (F, h, w, C0)."""
        graphdef, state = _split(self.pose_guider)

        def run(state, x):
            return nnx.merge(graphdef, state)(x)

        return self._jit("pose", run)(state, jnp.asarray(poses, jnp.float32) / 255.0)

    def _frame_sharding(self, ndim: int) -> NamedSharding | None:
        if self.mesh is None:
            return None
        return parallel.batch_sharding(self.mesh, ndim, batch_axes=tuple(self.mesh.axis_names))

    def denoise(
        self,
        latents: jax.Array,
        pose_features: jax.Array,
        reference_kv,
        context: jax.Array,
        *,
        steps: int,
        guidance_scale: float,
        windows: np.ndarray,
        progress: bool = False,
    ) -> jax.Array:
        """The sampling loop (one jitted scan). latents (F, h, w, C); windows (W, window)."""
        num_frames = latents.shape[0]
        windows, weights = self._pad_windows(windows)
        counts = np.zeros((num_frames,), np.float32)
        np.add.at(counts, windows.reshape(-1), weights.repeat(windows.shape[1]))
        timesteps = jnp.asarray(self.schedule.inference_timesteps(steps), jnp.int32)
        graphdef, state = _split(self.denoiser)
        schedule = self.schedule
        sharding = self._frame_sharding(4)
        window_len = windows.shape[1]
        self._bar = _progress_bar(steps, progress)

        def run(state, latents, pose_features, reference_kv, context, windows, weights, counts, timesteps, guidance):
            den = nnx.merge(graphdef, state)
            flat = windows.reshape(-1)
            w = jnp.repeat(weights, window_len)[:, None, None, None]

            def average(pred):
                summed = jnp.zeros_like(latents, jnp.float32).at[flat].add(pred.astype(jnp.float32) * w)
                return summed / counts[:, None, None, None]

            def body(x, inputs):
                i, t = inputs
                xw = jnp.take(x, flat, axis=0)
                pw = jnp.take(pose_features, flat, axis=0)
                if sharding is not None:
                    xw = jax.lax.with_sharding_constraint(xw, sharding)
                    pw = jax.lax.with_sharding_constraint(pw, sharding)
                cond = den(xw, t, context, num_frames=window_len, reference=reference_kv, pose_features=pw)
                uncond = den(xw, t, jnp.zeros_like(context), num_frames=window_len, reference=None, pose_features=pw)
                c, u = average(cond), average(uncond)
                guided = u + guidance * (c - u)
                x = ddim_step(schedule, guided, t, x.astype(jnp.float32), steps).astype(x.dtype)
                if progress:
                    jax.debug.callback(self._tick, i, ordered=True)
                return x, None

            out, _ = jax.lax.scan(body, latents, (jnp.arange(timesteps.shape[0]), timesteps))
            return out

        # Everything the traced function closes over is in the cache key.
        fn = self._jit(("denoise", steps, window_len, progress), run)
        try:
            out = fn(state, latents, pose_features, reference_kv, context, jnp.asarray(windows), jnp.asarray(weights),
                     jnp.asarray(counts), timesteps, jnp.float32(guidance_scale))
            return jax.block_until_ready(out)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _tick(self, _):
        if self._bar is not None:
            self._bar.update(1)

    def _pad_windows(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pads the window list so the frame batch divides evenly over the mesh; padded windows
        repeat window 0 with weight 0 (they cost compute but change nothing)."""
        windows = np.asarray(windows, np.int32)
        weights = np.ones((windows.shape[0],), np.float32)
        if self.mesh is None:
            return windows, weights
        n_dev = self.mesh.size
        per = n_dev // math.gcd(n_dev, windows.shape[1])  # windows needed for an even split
        pad = (-windows.shape[0]) % per
        if pad:
            windows = np.concatenate([windows, np.repeat(windows[:1], pad, axis=0)])
            weights = np.concatenate([weights, np.zeros((pad,), np.float32)])
        return windows, weights

    def decode(self, latents: jax.Array) -> np.ndarray:
        """(F, h, w, C) scaled latents -> (F, H, W, 3) uint8, in batches of ``decode_batch_size``."""
        graphdef, state = _split(self.vae)
        scale = self.latent_scale

        def run(state, z):
            image = nnx.merge(graphdef, state).decode(z / scale)
            return jnp.round(jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)

        fn = self._jit("decode", run)
        bs = self.decode_batch_size
        out = []
        for start in range(0, latents.shape[0], bs):
            chunk = latents[start:start + bs]
            n = chunk.shape[0]
            if n < bs:  # one compiled shape for every batch
                chunk = jnp.concatenate([chunk, jnp.zeros((bs - n,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(fn(state, chunk))[:n])
        return np.concatenate(out)

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
    ) -> AnimateOutput:
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
        channels = self.vae.config.latent_channels
        if latents is None:
            x = jax.random.normal(jax.random.key(seed), (num_frames, h, w, channels), jnp.float32)
        else:
            x = jnp.asarray(latents, jnp.float32)
            if x.shape != (num_frames, h, w, channels):
                raise ValueError(f"latents have shape {x.shape}; expected {(num_frames, h, w, channels)}")

        context = self.clip_context(reference)
        ref_kv = self.reference_features(self.encode_reference(ref_pixels), context)
        pose_feats = self.pose_features(pose_pixels)
        windows = windows_array(num_frames, context_frames, context_overlap, closed_loop)
        x = self.denoise(x, pose_feats, ref_kv, context, steps=steps, guidance_scale=guidance_scale,
                         windows=windows, progress=progress)
        frames = self.decode(x) if output_type in ("frames", "both") else None
        lat = np.asarray(x) if output_type in ("latents", "both") else None
        return AnimateOutput(frames=frames, latents=lat, reference=ref_pixels, poses=pose_pixels, fps=fps)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step")
