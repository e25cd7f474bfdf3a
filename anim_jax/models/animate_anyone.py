"""``AnimateAnyone``: the five networks of Animate Anyone as one object, used by training, sampling,
the pipeline, the demo and the benchmarks alike.

The networks sit under fixed names, so parameter paths read ``reference_net.up_blocks.3...``,
``denoiser.down_blocks.0.motion_modules.0...``, ``pose_guider...``, ``vae...``,
``image_encoder...``; trainable masks, checkpoints and converted-weights files all use them.

What a video needs, each computed once (``encode``, ``image_context``, ``reference``,
``pose_features``), then per denoising step ``predict`` (or ``predict_pair`` for classifier-free
guidance), then ``decode``:

* the reference image -> VAE latent -> ReferenceNet at t = 0 -> per-block tokens keyed by block
  path -> projected once by the denoiser's ``attn1`` (``UNet2DConditionModel.reference_kv``);
* the reference image -> CLIP -> one cross-attention token (unconditional: a zero token, or in
  training the encoded zero image, Moore's ``zeros_like`` of the normalised pixels);
* the pose frames -> PoseGuider -> features added after the denoiser's ``conv_in``.

Unconditional samples, exactly and in one pass: a video's reference keys/values can carry an
``enabled`` flag (``transformer.ReferenceKV``); a disabled video's reference keys get -inf logits
(probability exactly 0), so its frames do plain self-attention, up to float32 rounding of the
longer reductions (~1e-7 relative). Zeroed reference tokens would not do: attention over
``concat([x, 0])`` still gives the zero keys weight. ``predict_pair`` uses this to run the
conditional and unconditional predictions of classifier-free guidance as one batched call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.clip import clip_normalize
from anim_jax.models.transformer import ReferenceKV

COMPONENTS = ("reference_net", "denoiser", "pose_guider", "vae", "image_encoder")

ReferenceFeatures = dict  # {block path: ReferenceKV | None}, the denoiser's ``reference=``


class AnimateAnyone(nnx.Module):
    """The five networks under fixed attribute names (see the module docstring)."""

    def __init__(self, *, reference_net, denoiser, pose_guider, vae, image_encoder):
        self.reference_net = reference_net
        self.denoiser = denoiser
        self.pose_guider = pose_guider
        self.vae = vae
        self.image_encoder = image_encoder

    def components(self) -> dict[str, nnx.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}

    # -- geometry -----------------------------------------------------------------------------------

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_downscale(self) -> int:
        return int(self.vae.config.downscale)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def clip_size(self) -> int:
        return int(self.image_encoder.config.image_size)

    @property
    def max_window(self) -> int | None:
        """The longest context window the motion modules' position encoding allows (None: any)."""
        motion = getattr(self.denoiser.config, "motion", None)
        return None if motion is None else int(motion.temporal_position_encoding_max_len)

    # -- frozen encoders and decoder ------------------------------------------------------------------

    def encode(self, images: jax.Array, key: jax.Array | None = None, *, eps: jax.Array | None = None) -> jax.Array:
        """Images (..., H, W, 3) in [-1, 1] -> scaled latents (..., h, w, C), float32, no gradient.

        A draw from the VAE posterior with ``key``, or with given N(0, 1) draws ``eps`` of the
        latents' shape (training); its mean with neither (inference)."""
        mean, logvar = self.vae.encode(images)
        if eps is not None:
            z = mean + jnp.exp(0.5 * logvar) * eps.astype(mean.dtype)
        else:
            z = mean if key is None else self.vae.sample(mean, logvar, key)
        return jax.lax.stop_gradient(z.astype(jnp.float32) * self.latent_scale)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents (..., h, w, C) -> images (..., H, W, 3) in [0, 1], float32."""
        return decode_images(self.vae, latents)

    def image_context(self, clip_images: jax.Array, zero_image: jax.Array | None = None) -> jax.Array:
        """CLIP inputs (B, S, S, 3) uint8, already resized (``clip.clip_resize``) -> context
        (B, 1, D), float32. Differentiable: a frozen encoder gets no backward anyway (training
        differentiates only the trainable parameters), and one in ``config.trainable`` must learn.

        ``zero_image`` (bool (B,)): those samples encode a zero image instead (Moore's training
        unconditional input: ``zeros_like`` of the *normalised* pixel values)."""
        x = clip_normalize(clip_images)
        if zero_image is not None:
            x = jnp.where(zero_image[:, None, None, None], 0.0, x)
        embeds = self.image_encoder(x)
        return embeds[:, None, :].astype(jnp.float32)

    # -- trained networks ---------------------------------------------------------------------------

    def reference(self, ref_latents: jax.Array, context: jax.Array, enabled: jax.Array | None = None) -> ReferenceFeatures:
        """ReferenceNet at t = 0 on (B, h, w, C) latents -> the denoiser's reference keys/values,
        ``{block path: ReferenceKV}``, projected once by the denoiser's ``attn1``; tagged with the
        per-video ``enabled`` flags (bool (B,); None: all enabled)."""
        b = ref_latents.shape[0]
        tokens = self.reference_net(ref_latents, jnp.zeros((b,), jnp.int32), context)
        kv = self.denoiser.reference_kv(tokens)
        if enabled is None:
            return kv
        return {p: None if r is None else r._replace(enabled=enabled) for p, r in kv.items()}

    def pose_features(self, poses: jax.Array) -> jax.Array:
        """Pose renders (B, F, H, W, 3) in [0, 1] -> (B, F, h, w, C0)."""
        return self.pose_guider(poses)

    def predict(self, noisy: jax.Array, t, context: jax.Array, *, reference: ReferenceFeatures | None,
                pose_features: jax.Array) -> jax.Array:
        """Denoiser on (B, F, h, w, C) latents -> the prediction (B, F, h, w, C), float32.

        ``t``: scalar or (B,); ``context`` (B or 1, 1, D); ``reference``: ``reference``'s output
        (batch B or 1) or None; ``pose_features`` (B, F, h, w, C0)."""
        b, f = noisy.shape[:2]
        fold = lambda x: x.reshape((b * f,) + x.shape[2:])
        out = self.denoiser(fold(noisy), t, context, num_frames=f, reference=reference,
                            pose_features=fold(pose_features))
        return out.reshape(noisy.shape).astype(jnp.float32)

    def predict_pair(self, noisy: jax.Array, t, context: jax.Array, *, reference: ReferenceFeatures,
                     pose_features: jax.Array, batched: bool = True) -> tuple[jax.Array, jax.Array]:
        """The (unconditional, conditional) predictions of classifier-free guidance, Moore's
        inference branches: the unconditional one has a zero CLIP token and no reference attention.

        ``batched``: one denoiser call on ``[uncond; cond]`` with the reference masked for the
        unconditional half (see the module docstring); otherwise two calls. The two agree to float32
        rounding; which is faster is measured in benchmarks/RESULTS.md."""
        if not batched:
            uncond = self.predict(noisy, t, jnp.zeros_like(context), reference=None, pose_features=pose_features)
            cond = self.predict(noisy, t, context, reference=reference, pose_features=pose_features)
            return uncond, cond
        b = noisy.shape[0]
        twice = lambda x: jnp.concatenate([x, x])
        enabled = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
        ref2 = {}
        for path, r in reference.items():
            # Batch 1 broadcasts over all 2B videos; a per-video reference is repeated.
            ref2[path] = None if r is None else ReferenceKV(
                r.k if r.k.shape[0] == 1 else twice(r.k), r.v if r.v.shape[0] == 1 else twice(r.v), enabled)
        # One context shared by all videos stays one per half (the denoiser broadcasts it to the
        # consecutive rows of each half); per-video contexts are stacked [zeros; context].
        context2 = jnp.concatenate([jnp.zeros_like(context), context])
        t = jnp.asarray(t)
        pred = self.predict(twice(noisy), twice(t) if t.ndim else t, context2, reference=ref2,
                            pose_features=twice(pose_features))
        return pred[:b], pred[b:]


def decode_images(vae, latents: jax.Array) -> jax.Array:
    """``AnimateAnyone.decode`` with the VAE alone: scaled latents (..., h, w, C) -> images
    (..., H, W, 3) in [0, 1], float32. (A jitted decoder that takes only the VAE flattens its ~180
    arrays per call, not the whole model's ~1,450.)"""
    images = vae.decode(latents / float(vae.config.scaling_factor)).astype(jnp.float32)
    return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0)
