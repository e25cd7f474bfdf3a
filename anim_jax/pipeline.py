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

The windows of a step are denoised one per call (``window_batch``; each call's frames sharded over
the mesh), and the whole sampling loop is one jitted ``lax.scan``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anim_jax import compile_memory, media, native, parallel
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
    driving: "object | None" = None  # with driving_video=: anim_jax.driving.DrivingPoses (keypoints, pictures)
    trajectory: np.ndarray | None = None  # with keep_trajectory=True: (steps, F, h, w, C), latents after each step


class AnimatePipeline:
    """``AnimatePipeline(model=AnimateAnyone(...))`` or ``AnimatePipeline(denoiser=..., reference_net=...,
    pose_guider=..., vae=..., image_encoder=...)``; ``schedule`` (default Moore's inference schedule)
    and ``mesh`` may be changed between calls: every call compiles for what it is given.
    ``batch_guidance``: conditional and unconditional branch in one denoiser call (see
    benchmarks/RESULTS.md). ``native``: the settings used where a call gives none (from the weights
    directory with ``from_pretrained``; Moore's otherwise)."""

    def __init__(
        self,
        *,
        model: AnimateAnyone | None = None,
        schedule: NoiseSchedule | None = None,
        mesh: jax.sharding.Mesh | None = None,
        decode_batch_size: int = 8,
        batch_guidance: bool = True,
        native: native.NativeSettings = native.MOORE,
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
        self.native = native
        self._bar = None
        self._on_step = None
        self._compiled: set[tuple] = set()
        compile_memory.release_after_compiles()  # the compiler's freed memory goes back to the system

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
        from anim_jax import weights_dir
        from anim_jax.convert.components import load_components

        components = load_components(directory, dtype=dtype, attention=attention)
        schedule = components.pop("schedule")
        model = AnimateAnyone(**components)
        if mesh is not None:
            parallel.shard_model(model, mesh, rules)
        kwargs.setdefault("native", native.from_config(weights_dir.read_config(directory)))
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
        pose_frames=None,
        *,
        width: int | None = None,
        height: int | None = None,
        num_frames: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 42,
        latents: np.ndarray | None = None,
        context_frames: int | None = None,
        context_overlap: int | None = None,
        closed_loop: bool = True,
        output_type: str = "frames",
        progress: bool = False,
        driving_video=None,
        pose_extractor=None,
        align: bool = True,
        reference_frame: int = 0,
        on_step: Callable[[int], None] | None = None,
        keep_trajectory: bool = False,
        steps_per_call: int | None = None,
        window_batch: int | None = 1,
    ) -> AnimateOutput:
        """``pose_frames``: rendered pose pictures (a video, a folder of images, an array); or, instead,
        ``driving_video`` (a video of a person, a path or (F, H, W, 3) frames) with ``pose_extractor``
        (a ``PoseExtractor`` or a converted DWPose directory): its poses are extracted, aligned to the
        reference's body unless ``align=False`` (``anim_jax.pose.align``), and drawn as Moore draws them.
        ``reference_image`` may be a video path (its frame ``reference_frame``). Sizes, steps, guidance
        and context frames left at None are the pipeline's ``native`` settings; ``context_overlap`` None
        is Moore's 4 frames (fewer when a window is shorter). ``on_step(i)``: called on the host after
        DDIM step ``i`` (0-based), e.g. to drive a progress display other than the terminal bar of
        ``progress``. ``keep_trajectory``: also return the latents after every step
        (``AnimateOutput.trajectory``). ``steps_per_call``: DDIM steps per compiled program (None:
        all). ``window_batch``: context windows per denoiser call (None: all windows of a step at
        once, which holds all their activations)."""
        from anim_jax import driving as driving_lib

        width = self.native.width if width is None else width
        height = self.native.height if height is None else height
        steps = self.native.steps if steps is None else steps
        guidance_scale = self.native.guidance_scale if guidance_scale is None else guidance_scale
        context_frames = self.native.context_frames if context_frames is None else context_frames
        if (pose_frames is None) == (driving_video is None):
            raise ValueError("give either pose_frames (rendered poses) or driving_video (with pose_extractor)")
        reference_image = driving_lib.reference_image(reference_image, reference_frame)
        drive = None
        if driving_video is not None:
            drive = driving_lib.driving_poses(
                driving_video, reference_image, pose_extractor, align=align, max_frames=num_frames, progress=progress
            )
            pose_frames = drive.pictures
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

        if context_overlap is None:  # Moore's 4, or less where a window is shorter than 5 frames
            context_overlap = min(4, window - 1)
        windows = windows_array(num_frames, context_frames, context_overlap, closed_loop)
        self._say_compiling((width, height, window, num_frames, steps, guidance_scale != 1.0), progress)
        self._bar = _progress_bar(steps, progress)
        self._on_step = on_step
        try:
            out = sampling.sample(
                self.model, x[None], reference=(ref_pixels.astype(np.float32) / 127.5 - 1.0)[None],
                clip=clip_resize(reference, self.model.clip_size), poses=(pose_pixels.astype(np.float32) / 255.0)[None],
                schedule=self.schedule, steps=steps, guidance_scale=guidance_scale, windows=windows, mesh=self.mesh,
                batch_guidance=self.batch_guidance, callback=self._tick if (progress or on_step is not None) else None,
                trajectory=keep_trajectory, steps_per_call=steps_per_call,
                window_batch=window_batch,
            )
            x, every = (out[0][0], np.asarray(out[1][:, 0])) if keep_trajectory else (out[0], None)
            x = jax.block_until_ready(x)
            if progress:
                jax.effects_barrier()  # every step's (unordered) progress callback has run
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._on_step = None
        frames = (sampling.decode_frames(self.model, x, self.decode_batch_size, self.mesh)
                  if output_type in ("frames", "both") else None)
        lat = np.asarray(x) if output_type in ("latents", "both") else None
        if drive is not None and fps is None:
            fps = drive.fps
        return AnimateOutput(frames=frames, latents=lat, reference=ref_pixels, poses=pose_pixels, fps=fps, driving=drive,
                             trajectory=every)

    def _say_compiling(self, key: tuple, enabled: bool) -> None:
        """The first call for a size waits for XLA to compile the sampler; say so, with a rough time."""
        if key in self._compiled:
            return
        self._compiled.add(key)
        if not enabled:
            return
        width, height, window = key[:3]
        backend = jax.default_backend()
        print(f"compiling the sampler for {width}x{height}x{window} (first call for this size; "
              f"{_compile_estimate(self.model, backend)} on {backend.upper()})...", file=sys.stderr, flush=True)


def _compile_estimate(model, backend: str) -> str:
    """A rough compile time from the denoiser's size: XLA's compile time grows with the number of
    operations, which tracks the UNet's size far more than the frame size."""
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model.denoiser, nnx.Param)))
    if params < 50e6:
        return "~10-60 s"
    return "~1-3 min" if backend == "gpu" else "~3-10 min"


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoising", unit="step")
