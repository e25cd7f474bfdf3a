"""Animate Anyone training: the model bundle, the loss, initialisation and the stage setup.

The bundle ``AnimateAnyoneModel`` holds the five networks under fixed names, so parameter paths
read ``reference_net.up_blocks.3...``, ``denoiser.down_blocks.0.motion_modules.0...``,
``pose_guider...``, ``vae...``, ``image_encoder...``; the trainable mask, the checkpoints and the
converted-weights files all use these paths.

The loss (Moore-AnimateAnyone ``train_stage_{1,2}.py``, research/moore.md section 5.3), per step:

1. ``latents = vae.encode(target).sample() * scaling``; stage 1 has a frame axis of 1, stage 2 F.
2. ``noise = randn + noise_offset * randn(B, 1, .., C)`` (offset noise, 0.05).
3. ``t ~ U{0 .. T-1}`` per sample; ``noisy = add_noise(latents, noise, t)`` and the target
   ``velocity(latents, noise, t)`` under the zero-SNR scaled_linear *training* schedule.
4. With probability ``uncond_ratio`` (0.1) a sample is unconditional: its CLIP input is a zero image
   (Moore zeroes the normalised pixel values and encodes them) and it gets **no reference
   attention**. Otherwise the ReferenceNet's features (timestep 0, reference latents sampled from
   the VAE, the sample's CLIP context) are appended to every self-attention of the denoiser;
   gradients flow into the ReferenceNet (stage 1).
5. ``pred = denoiser(noisy, t, clip, reference, pose_guider(pose))``; the loss is the min-SNR-γ
   (γ = 5, v-prediction "snr + 1" form) weighted MSE.

Unconditional samples, exactly and in one pass: the ReferenceNet runs on the whole batch and every
video's reference keys/values carry a per-video ``enabled`` flag (``transformer.ReferenceKV``).
Attention masks a disabled video's reference keys with -inf logits (probability exactly 0), so its
frames attend to their own tokens only: plain self-attention, up to float32 rounding of the longer
reductions (~1e-7 relative; tests/test_train_animate_anyone.py).
Zeroed reference tokens would not do: attention over ``concat([x, 0])`` still gives the zero keys
weight. Cost: the ReferenceNet forward/backward and the attention over the (masked) reference keys
are spent on the ~10% unconditional samples too; nothing runs twice. Moore draws one decision per
step and per GPU (``random.random() < uncond_ratio`` for its whole local batch, skipping the
ReferenceNet); ``uncond_per_sample=False`` draws one decision for the whole global batch.

Stages (``trainable_filter``): stage 1 trains the denoiser (no motion modules), the ReferenceNet
except its last up block (``up_blocks.3`` at SD size: only its first transformer's ``norm1`` output
is used, the rest never reaches the loss) and the PoseGuider; stage 2 only the motion modules.
Frozen parameters (VAE, CLIP, and whatever the stage does not train) are held in ``frozen_dtype``
(bf16) by ``train.state``; trainable ones keep float32 masters and compute in the modules' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from anim_jax import parallel
from anim_jax.diffusion import (
    NoiseSchedule,
    add_noise,
    ddim_step,
    diffusion_loss,
    min_snr_weight,
    moore_inference_schedule,
    moore_training_schedule,
    offset_noise,
    training_target,
)
from anim_jax.models import factory
from anim_jax.models.attention_ops import AttentionConfig
from anim_jax.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from anim_jax.models.transformer import ReferenceKV
from anim_jax.train import metrics as metrics_lib
from anim_jax.train import optim
from anim_jax.train import state as train_state

log = logging.getLogger(__name__)

COMPONENTS = ("reference_net", "denoiser", "pose_guider", "vae", "image_encoder")

# --------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------


class AnimateAnyoneModel(nnx.Module):
    """The five networks of Animate Anyone under fixed attribute names (see the module docstring)."""

    def __init__(self, *, reference_net, denoiser, pose_guider, vae, image_encoder):
        self.reference_net = reference_net
        self.denoiser = denoiser
        self.pose_guider = pose_guider
        self.vae = vae
        self.image_encoder = image_encoder

    def components(self) -> dict[str, nnx.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    # -- frozen encoders ---------------------------------------------------------------------------

    def encode(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images (..., H, W, 3) in [-1, 1] -> scaled latents (..., h, w, C), float32, no gradient.

        A draw from the VAE posterior with ``key`` (training), its mean without (inference)."""
        mean, logvar = self.vae.encode(images)
        z = mean if key is None else self.vae.sample(mean, logvar, key)
        return jax.lax.stop_gradient(z.astype(jnp.float32) * self.latent_scale)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents (..., h, w, C) -> images (..., H, W, 3) in [0, 1], float32."""
        images = self.vae.decode(latents / self.latent_scale).astype(jnp.float32)
        return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0)

    def image_context(self, clip_images: jax.Array, zero_image: jax.Array | None = None) -> jax.Array:
        """CLIP inputs (B, S, S, 3) uint8 (already resized/cropped) -> context (B, 1, D), no gradient.

        ``zero_image`` (bool (B,)): those samples encode a zero image instead (Moore's training
        unconditional input: ``zeros_like`` of the *normalised* pixel values)."""
        x = clip_images.astype(jnp.float32) / 255.0
        x = (x - jnp.asarray(OPENAI_CLIP_MEAN, jnp.float32)) / jnp.asarray(OPENAI_CLIP_STD, jnp.float32)
        if zero_image is not None:
            x = jnp.where(zero_image[:, None, None, None], 0.0, x)
        embeds = self.image_encoder(x)
        return jax.lax.stop_gradient(embeds[:, None, :].astype(jnp.float32))

    # -- trained networks -------------------------------------------------------------------------

    def reference(self, ref_latents: jax.Array, context: jax.Array, enabled: jax.Array | None = None):
        """ReferenceNet at t = 0 on (B, h, w, C) latents -> the denoiser's per-block reference keys and
        values (``ReferenceKV`` each, projected once by the denoiser's ``attn1``), tagged with the
        per-video ``enabled`` flags (bool (B,); None: all enabled)."""
        b = ref_latents.shape[0]
        tokens = self.reference_net(ref_latents, jnp.zeros((b,), jnp.int32), context)
        kv = self.denoiser.reference_kv(tokens)
        if enabled is None:
            return kv
        return [None if r is None else r._replace(enabled=enabled) for r in kv]

    def pose_features(self, poses: jax.Array) -> jax.Array:
        """Pose renders (B, F, H, W, 3) in [0, 1] -> (B*F, h, w, C0)."""
        f = self.pose_guider(poses)
        return f.reshape((-1,) + f.shape[2:])

    def predict(self, noisy, t, context, *, reference, pose_features) -> jax.Array:
        """Denoiser on (B, F, h, w, C) -> the prediction (B, F, h, w, C), float32."""
        b, f = noisy.shape[:2]
        out = self.denoiser(
            noisy.reshape((b * f,) + noisy.shape[2:]), t, context,
            num_frames=f, reference=reference, pose_features=pose_features,
        )
        return out.reshape(noisy.shape).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

BATCH_KEYS = {1: ("target", "pose", "reference", "clip"), 2: ("frames", "poses", "reference", "clip")}


def as_video_batch(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A stage-1 or stage-2 batch (grain_pipeline element format, float or uint8 images) ->
    ``(frames (B,F,H,W,3) in [-1,1], poses (B,F,H,W,3) in [0,1], reference (B,H,W,3), clip uint8)``."""
    from data_pipelines.grain_pipeline import normalize_batch

    batch = normalize_batch(batch)
    if "frames" in batch:
        frames, poses = batch["frames"], batch["poses"]
    elif "target" in batch:
        frames, poses = batch["target"][:, None], batch["pose"][:, None]
    else:
        raise KeyError(f"a training batch needs 'target'/'pose' (stage 1) or 'frames'/'poses' (stage 2); got {sorted(batch)}")
    return frames, poses, batch["reference"], batch["clip"]


def batch_spec(stage: int, batch_size: int, resolution: Sequence[int], clip_size: int, num_frames: int = 1,
               uint8: bool = True) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a global training batch as the step receives it (no ``index``)."""
    h, w = resolution
    img = jnp.uint8 if uint8 else jnp.float32
    lead = (batch_size,) if stage == 1 else (batch_size, num_frames)
    keys = BATCH_KEYS[stage]
    return {
        keys[0]: jax.ShapeDtypeStruct(lead + (h, w, 3), img),
        keys[1]: jax.ShapeDtypeStruct(lead + (h, w, 3), img),
        "reference": jax.ShapeDtypeStruct((batch_size, h, w, 3), img),
        "clip": jax.ShapeDtypeStruct((batch_size, clip_size, clip_size, 3), jnp.uint8),
    }


def batch_shardings(mesh, spec: Mapping[str, Any]) -> dict:
    """Leading (batch) axis over the mesh's data/fsdp axes, the rest replicated."""
    return {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in spec.items()}


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    uncond_ratio: float = 0.1
    uncond_per_sample: bool = True  # False: one draw for the whole (global) batch
    noise_offset: float = 0.05
    snr_gamma: float | None = 5.0  # None: plain MSE
    timestep_buckets: int = 4  # loss_t/<lo>-<hi> metrics

    @classmethod
    def from_config(cls, cfg) -> "LossConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = dict(cfg) if cfg is not None else {}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"config.loss: unknown field(s) {unknown}; known: {sorted(names)}")
        out = cls(**values)
        if not 0.0 <= out.uncond_ratio <= 1.0:
            raise ValueError(f"config.loss.uncond_ratio must be in [0, 1], got {out.uncond_ratio}")
        return out


def make_loss_fn(loss_cfg: LossConfig, schedule: NoiseSchedule | None = None):
    """``loss_fn(model: AnimateAnyoneModel, batch, rng) -> (loss, aux)`` for ``train.state``.

    ``aux``: ``mse`` (unweighted), ``snr_weight`` (mean min-SNR weight), ``uncond_fraction`` and the
    weighted loss per timestep bucket (``loss_t/000-249`` ...; NaN where a bucket is empty).
    """
    schedule = schedule or moore_training_schedule()
    T = schedule.num_train_timesteps

    def loss_fn(model: AnimateAnyoneModel, batch, rng):
        frames, poses, reference, clip = as_video_batch(batch)
        b = frames.shape[0]
        k_lat, k_noise, k_t, k_unc = jax.random.split(rng, 4)
        f = frames.shape[1]
        # One VAE pass over the target frames and the reference images.
        both = model.encode(jnp.concatenate([frames.reshape((b * f,) + frames.shape[2:]), reference]), k_lat)
        latents, ref_latents = both[: b * f].reshape((b, f) + both.shape[1:]), both[b * f:]
        noise = offset_noise(k_noise, latents.shape, loss_cfg.noise_offset)
        t = jax.random.randint(k_t, (b,), 0, T)
        noisy = add_noise(schedule, latents, noise, t)
        target = training_target(schedule, latents, noise, t)
        if loss_cfg.uncond_per_sample:
            uncond = jax.random.bernoulli(k_unc, loss_cfg.uncond_ratio, (b,))
        else:
            uncond = jnp.broadcast_to(jax.random.bernoulli(k_unc, loss_cfg.uncond_ratio), (b,))
        context = model.image_context(clip, zero_image=uncond)
        kv = model.reference(ref_latents, context, enabled=~uncond)
        pred = model.predict(noisy, t, context, reference=kv, pose_features=model.pose_features(poses))
        loss = diffusion_loss(pred, target, t, schedule, loss_cfg.snr_gamma)
        per_sample = jnp.mean(jnp.square(pred - target).reshape(b, -1), axis=1)
        weight = min_snr_weight(schedule, t, loss_cfg.snr_gamma) if loss_cfg.snr_gamma else jnp.ones_like(per_sample)
        aux = dict(mse=per_sample.mean(), snr_weight=weight.mean(), uncond_fraction=uncond.mean(dtype=jnp.float32))
        aux.update(metrics_lib.timestep_bucket_losses(weight * per_sample, t, loss_cfg.timestep_buckets, T))
        return loss, aux

    return loss_fn


# --------------------------------------------------------------------------------------------
# Rematerialisation
# --------------------------------------------------------------------------------------------

REMAT_POLICIES = {
    "full": None,  # save nothing inside a block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
}


def _remat_call(base_call: Callable, policy):
    """``__call__`` running ``base_call`` under ``jax.checkpoint``; Python scalars stay static."""

    def __call__(self, *args, **kwargs):
        graphdef, state = nnx.split(self)
        leaves, treedef = jax.tree.flatten((args, kwargs))
        dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

        def pure(state, values):
            leaves_ = list(leaves)
            for i, v in zip(dynamic, values):
                leaves_[i] = v
            a, k = jax.tree.unflatten(treedef, leaves_)
            return base_call(nnx.merge(graphdef, state), *a, **k)

        return jax.checkpoint(pure, policy=policy)(state, [leaves[i] for i in dynamic])

    return __call__


@functools.lru_cache(maxsize=None)
def _remat_class(cls: type, policy_name: str) -> type:
    body = {"__call__": _remat_call(cls.__call__, REMAT_POLICIES[policy_name]), "__module__": __name__,
            "__doc__": f"{cls.__name__}, rematerialised in the backward pass (policy {policy_name!r})."}
    return types.new_class(f"Remat{cls.__name__}_{policy_name}", (cls,), exec_body=lambda ns: ns.update(body))


def remat_block_types() -> tuple[type, ...]:
    from anim_jax.models.resnet import ResnetBlock2D
    from anim_jax.models.transformer import Transformer2DModel

    types_: list[type] = [ResnetBlock2D, Transformer2DModel]
    try:
        from anim_jax.models.motion import MotionModule

        types_.append(MotionModule)
    except ImportError:  # pragma: no cover - motion modules are part of the package
        pass
    return tuple(types_)


def apply_remat(module: nnx.Module, policy: str) -> int:
    """Rematerialises every ResNet block, spatial transformer and motion module of ``module`` (the
    granularity of PyTorch gradient checkpointing in Moore's UNet3D): their activations are
    recomputed in the backward pass instead of stored. ``policy``: "none", "full" (save nothing
    inside a block) or "dots" (keep the weight matmul outputs). Parameter paths do not change (each
    block's class is swapped for a rematerialising subclass). Returns the number of blocks."""
    if policy == "none":
        return 0
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {['none', *REMAT_POLICIES]}")
    blocks = remat_block_types()
    count = 0
    for _, node in nnx.iter_graph(module):
        cls = type(node)
        if isinstance(node, blocks) and cls in blocks:
            node.__class__ = _remat_class(cls, policy)
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# Architecture and initialisation
# --------------------------------------------------------------------------------------------


def _plain(value):
    """ConfigDicts / tuples -> JSON-like dicts / lists (what ``factory.build`` reads)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def attention_config(cfg) -> AttentionConfig:
    m = cfg.model
    return AttentionConfig(m.attention, query_chunk_size=int(m.get("query_chunk_size", 1024)))


def compute_dtype(cfg):
    return jnp.dtype(cfg.model.compute_dtype)


def component_configs(cfg, stage: int | None = None) -> dict[str, dict]:
    """Each component's architecture (JSON dicts as ``factory.build`` takes): from the converted
    weights directory ``cfg.init.weights_dir`` where it has the component, else from
    ``cfg.model.components``; the ReferenceNet shares the denoiser's UNet config. The denoiser gets
    the stage's motion modules (stage 2: ``cfg.model.motion``; stage 1: none) and
    ``cfg.model.groupnorm_over_frames``."""
    from anim_jax.convert import store

    stage = int(stage or cfg.stage)
    given = _plain(cfg.model.components)
    stored: dict[str, Any] = {}
    weights_dir = cfg.init.get("weights_dir", "")
    if weights_dir:
        stored = store.read_config(weights_dir)
    out: dict[str, dict] = {}
    for name in COMPONENTS:
        if name in stored:
            out[name] = dict(stored[name])
    unet = out.get("denoiser") or out.get("reference_net") or given.get("unet")
    if unet is None:
        raise ValueError("no UNet architecture: set config.model.components.unet or config.init.weights_dir")
    out.setdefault("denoiser", dict(unet))
    out.setdefault("reference_net", dict(unet))
    for name, key in (("pose_guider", "pose_guider"), ("vae", "vae"), ("image_encoder", "image_encoder")):
        if name not in out:
            if key not in given:
                raise ValueError(f"no {name} architecture: set config.model.components.{key} or config.init.weights_dir")
            out[name] = dict(given[key])
    for name in ("denoiser", "reference_net"):
        out[name]["groupnorm_over_frames"] = bool(cfg.model.get("groupnorm_over_frames", False))
        out[name]["motion"] = None
    if stage == 2:
        motion = _plain(cfg.model.get("motion"))
        if not motion:
            raise ValueError("stage 2 needs config.model.motion (the motion-module architecture)")
        out["denoiser"]["motion"] = dict(motion)
    _check_geometry(out, cfg)
    return out


def _check_geometry(configs: Mapping[str, dict], cfg) -> None:
    unet_ch = tuple(configs["denoiser"]["block_out_channels"])
    pg = configs["pose_guider"]
    pg_channels = pg.get("conditioning_embedding_channels", 320)
    if pg_channels != unet_ch[0]:
        raise ValueError(f"pose_guider.conditioning_embedding_channels {pg_channels} != the UNet's first width {unet_ch[0]}")
    ctx = configs["image_encoder"].get("projection_dim", 768)
    if ctx != configs["denoiser"].get("cross_attention_dim", 1280):
        raise ValueError(
            f"image_encoder.projection_dim {ctx} != the UNet's cross_attention_dim {configs['denoiser'].get('cross_attention_dim')}"
        )
    vae = configs["vae"]
    if vae.get("kind") == "pixel_unshuffle":
        vae_down = int(vae.get("factor", 4))
        latent_channels = int(vae.get("in_channels", 3)) * vae_down**2
    else:
        vae_down = 2 ** (len(vae.get("block_out_channels", (128, 256, 512, 512))) - 1)
        latent_channels = int(vae.get("latent_channels", 4))
    for key in ("in_channels", "out_channels"):
        if int(configs["denoiser"].get(key, 4)) != latent_channels:
            raise ValueError(f"the UNet's {key} {configs['denoiser'].get(key, 4)} != the autoencoder's {latent_channels} latent channels")
    data = cfg.get("data")
    if data is None:
        return
    pg_down = 2 ** (len(pg.get("block_out_channels", (16, 32, 96, 256))) - 1)
    if vae_down != pg_down:
        raise ValueError(f"the VAE downsamples by {vae_down} but the PoseGuider by {pg_down}")
    unet_down = 2 ** (len(unet_ch) - 1)
    for side in tuple(data.resolution):
        if side % (vae_down * unet_down):
            raise ValueError(
                f"config.data.resolution {tuple(data.resolution)}: each side must be a multiple of "
                f"{vae_down * unet_down} (VAE x UNet downsampling)"
            )
    clip_size = configs["image_encoder"].get("image_size", 224)
    if int(data.clip_size) != clip_size:
        raise ValueError(f"config.data.clip_size {data.clip_size} != the image encoder's image_size {clip_size}")


def build_model(cfg, stage: int | None = None, *, abstract: bool = False, seed: int | None = None) -> AnimateAnyoneModel:
    """The bundle from ``component_configs`` with random (or, ``abstract``, shape-only) parameters.
    Trained components compute in ``cfg.model.compute_dtype``, frozen encoders too."""
    configs = component_configs(cfg, stage)
    kw = dict(dtype=compute_dtype(cfg), attention=attention_config(cfg), abstract=abstract)
    seed = int(cfg.seed if seed is None else seed)
    mods = {name: factory.build(name, configs[name], seed=seed + i, **kw) for i, name in enumerate(COMPONENTS)}
    return AnimateAnyoneModel(**mods)


def flat_arrays(module) -> dict[str, Any]:
    """``{dotted path: array}`` of every parameter."""
    return {optim.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def assign(module: nnx.Module, arrays: Mapping[str, Any], *, source: str, select: Callable[[str], bool] = lambda p: True,
           require_all: bool = False) -> set[str]:
    """Copies ``arrays[path]`` into each selected parameter of ``module`` that ``arrays`` holds
    (shapes must match; values take the parameter's dtype). ``require_all``: every selected
    parameter must be present. Returns the assigned paths."""
    params = {optim.path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    done, misshaped = set(), []
    for path, var in params.items():
        if not select(path) or path not in arrays:
            continue
        value = arrays[path]
        if tuple(value.shape) != tuple(var.shape):
            misshaped.append(f"{path}: {source} {tuple(value.shape)}, model {tuple(var.shape)}")
            continue
        var.value = jnp.asarray(np.asarray(value), dtype=var.get_value().dtype)
        done.add(path)
    missing = sorted(p for p in params if select(p) and p not in done and p not in {m.split(":")[0] for m in misshaped})
    if misshaped or (require_all and missing):
        lines = [f"{source} does not fit the model:"]
        if misshaped:
            lines.append(f"  {len(misshaped)} misshaped: " + "; ".join(misshaped[:10]))
        if require_all and missing:
            lines.append(f"  {len(missing)} missing: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        from anim_jax.convert.mapping import CheckpointMismatchError

        raise CheckpointMismatchError("\n".join(lines))
    return done


def _is_motion(path: str) -> bool:
    return "motion_modules." in path


def read_weights_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    return load_file(str(path))


def read_train_checkpoint(directory: str | os.PathLike, step: int | None = None,
                          items: Sequence[str] = ("params", "frozen")) -> dict[str, np.ndarray]:
    """Parameters of a training run's Orbax checkpoint (``<workdir>/checkpoints``) as host arrays
    keyed by their bundle path (``denoiser.conv_in.kernel`` ...), whatever mesh wrote them. Only
    ``items`` are read (not the optimizer state); ``step`` None: the latest."""
    import orbax.checkpoint as ocp
    from etils import epath

    from anim_jax.checkpoint import CheckpointManager

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    if step is None or step < 0:
        with CheckpointManager(directory, async_save=False) as mngr:
            step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory!r}")
    path = epath.Path(directory) / str(int(step)) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = dict(ckptr.metadata(path).item_metadata)
    item = {k: tree[k] for k in items if k in tree}
    if not item:
        raise ValueError(f"{path} holds none of {list(items)} (it has {sorted(tree)})")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    out = {}
    for name, sub in restored.items():
        # Parameters keep their bundle paths; other items (opt_state, rng, step) are prefixed by name.
        prefix = () if name in ("params", "frozen") else (name,)
        for p, v in jax.tree_util.tree_flatten_with_path(sub)[0]:
            keys = prefix + tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)
            out[".".join(keys)] = np.asarray(v)
    log.info("read %d arrays from %s (step %d)", len(out), path, step)
    return out


def load_motion_modules(denoiser: nnx.Module, path: str | os.PathLike) -> int:
    """Motion modules into every motion module of ``denoiser``, each strictly, from an AnimateDiff
    checkpoint (``mm_sd_v15_v2.ckpt`` original format, or a diffusers ``MotionAdapter`` state dict;
    positional-encoding buffers are ignored, the model recomputes them) or from a converted-weights
    directory whose denoiser has motion modules. Returns the number of modules."""
    from anim_jax.convert import readers, store
    from anim_jax.convert.mapping import load_torch_state_dict, prefixed
    from anim_jax.convert.motion_keys import MOTION_KEYMAP_DIFFUSERS, MOTION_KEYMAP_ORIGINAL
    from anim_jax.models.motion import MotionModule

    modules = [optim.path_str(p) for p, node in nnx.iter_graph(denoiser) if isinstance(node, MotionModule)]
    if not modules:
        raise ValueError("the denoiser has no motion modules to load (stage 2 needs config.model.motion)")
    if (pathlib.Path(path) / store.CONFIG_NAME).is_file():
        file = pathlib.Path(path) / "denoiser.safetensors"
        assign(denoiser, read_weights_file(file), source=str(file), select=_is_motion, require_all=True)
        return len(modules)
    sd = readers.read_checkpoint(path)
    sd = {re.sub(r"^(module\.|unet\.)", "", k): v for k, v in sd.items()}
    original = any("temporal_transformer." in k for k in sd)
    keymap = MOTION_KEYMAP_ORIGINAL if original else MOTION_KEYMAP_DIFFUSERS
    for p, node in nnx.iter_graph(denoiser):
        if isinstance(node, MotionModule):
            prefix = optim.path_str(p)
            load_torch_state_dict(node, prefixed(sd, prefix), keymap, source=f"{path} ({prefix}.*)")
    return len(modules)


def init_model(cfg, stage: int | None = None) -> AnimateAnyoneModel:
    """The bundle initialised for training (see configs/stage1.py ``init`` fields):

    * ``init.weights_dir``: a converted-weights directory (``anim-jax convert`` or a previous
      stage's export): every component it has. A missing ``reference_net`` is copied from its
      ``denoiser`` (Moore initialises both from the same SD UNet); motion modules in the file are
      skipped in stage 1. Components without a source keep their random initialisation (a warning
      says so); with no ``weights_dir`` at all everything is random (tiny runs, benchmarks).
    * ``init.reference_net_from_denoiser``: a ReferenceNet with no source starts as a copy of the
      denoiser (random or loaded), as in Moore where both come from one SD UNet.
    * ``init.controlnet`` (stage 1): a ControlNet-openpose checkpoint for the PoseGuider.
    * ``init.stage1_checkpoint`` / ``init.stage1_step`` (stage 2): a stage-1 run's Orbax
      checkpoint directory; its parameters replace those of the same path.
    * ``init.motion_modules`` (stage 2): AnimateDiff motion modules (``mm_sd_v15_v2.ckpt``).
    """
    stage = int(stage or cfg.stage)
    init = cfg.init
    model = build_model(cfg, stage)
    weights_dir = init.get("weights_dir", "")
    sources = {name: "random" for name in COMPONENTS}
    if weights_dir:
        d = pathlib.Path(weights_dir)
        files = {name: d / f"{name}.safetensors" for name in COMPONENTS}
        for name in COMPONENTS:
            file = files[name]
            src_name = name
            if name == "reference_net" and not file.is_file() and files["denoiser"].is_file():
                file, src_name = files["denoiser"], "denoiser"
            if not file.is_file():
                continue
            module = getattr(model, name)
            arrays = read_weights_file(file)
            if name == "reference_net" and src_name == "denoiser":
                select = lambda p: not _is_motion(p)
            elif name == "denoiser":
                select = (lambda p: not _is_motion(p)) if stage == 1 else (lambda p: True)
            else:
                select = lambda p: True
            done = assign(module, arrays, source=str(file), select=select)
            expected = {p for p in flat_arrays(module) if select(p)}
            missing = sorted(expected - done)
            if missing and not (name == "denoiser" and all(_is_motion(p) for p in missing)):
                from anim_jax.convert.mapping import CheckpointMismatchError

                raise CheckpointMismatchError(
                    f"{file} lacks {len(missing)} parameters of {name}: {', '.join(missing[:8])}"
                    + (" ..." if len(missing) > 8 else "")
                )
            sources[name] = str(file)
    if stage == 1 and init.get("controlnet", ""):
        from anim_jax.convert import readers
        from anim_jax.convert.pose_guider_keys import load_controlnet_cond_embedding

        sd = readers.read_checkpoint(init.controlnet)
        load_controlnet_cond_embedding(model.pose_guider, sd, source=str(init.controlnet))
        sources["pose_guider"] = f"{init.controlnet} (ControlNet cond embedding)"
    if stage == 2 and init.get("stage1_checkpoint", ""):
        arrays = read_train_checkpoint(init.stage1_checkpoint, int(init.get("stage1_step", -1)))
        done = assign(model, arrays, source=str(init.stage1_checkpoint), select=lambda p: not _is_motion(p))
        for name in COMPONENTS:
            if any(p.startswith(name + ".") for p in done):
                sources[name] = f"{init.stage1_checkpoint} (stage 1)"
    if sources["reference_net"] == "random" and init.get("reference_net_from_denoiser", False):
        # Moore starts both UNets from the same SD weights, so at step 0 the ReferenceNet's keys live
        # in the denoiser's feature space and reference attention can match like with like. Two
        # independent random inits lack that, and a from-scratch run learns to copy far more slowly.
        done = assign(model.reference_net, flat_arrays(model.denoiser), source="denoiser",
                      select=lambda p: not _is_motion(p), require_all=True)
        sources["reference_net"] = f"copy of the denoiser's {sources['denoiser']} initialisation ({len(done)} arrays)"
    if stage == 2 and init.get("motion_modules", ""):
        n = load_motion_modules(model.denoiser, init.motion_modules)
        sources["denoiser"] += f" + {n} motion modules from {init.motion_modules}"
    for name, src in sources.items():
        (log.warning if src == "random" and weights_dir else log.info)("%s: %s", name, src)
    return model


# --------------------------------------------------------------------------------------------
# Stage setup
# --------------------------------------------------------------------------------------------


def last_up_block(model: AnimateAnyoneModel) -> int:
    return len(model.reference_net.up_blocks) - 1


def trainable_filter(model: AnimateAnyoneModel, stage: int, include: Sequence[str] = (),
                     exclude: Sequence[str] = ()) -> optim.TrainableFilter:
    """Stage 1: denoiser, ReferenceNet except its last up block, PoseGuider. Stage 2: the motion
    modules. Non-empty ``include``/``exclude`` replace the stage's patterns (regexes on paths)."""
    if stage == 1:
        inc = (r"^denoiser\.", r"^reference_net\.", r"^pose_guider\.")
        exc = (rf"^reference_net\.up_blocks\.{last_up_block(model)}\.",)
        if any(_is_motion(optim.path_str(p)) for p, _ in nnx.to_flat_state(nnx.state(model.denoiser, nnx.Param))):
            raise ValueError("stage 1 trains a denoiser without motion modules; config.model.motion must be unset")
    elif stage == 2:
        inc, exc = (r"^denoiser\..*\.motion_modules\.",), ()
    else:
        raise ValueError(f"config.stage must be 1 or 2, got {stage}")
    return optim.trainable_mask(model, include=tuple(include) or inc, exclude=tuple(exclude) or exc)


def mesh_from_config(cfg) -> jax.sharding.Mesh:
    m = cfg.mesh
    devices = jax.devices()
    n = int(m.get("num_devices", 0) or 0)
    if n:
        if n > len(devices):
            raise ValueError(f"config.mesh.num_devices={n} but only {len(devices)} devices are available")
        devices = devices[:n]
    return parallel.make_mesh(tuple(m.shape), tuple(m.axis_names), devices=devices)


def rules_from_config(cfg) -> tuple:
    return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in cfg.mesh.rules)


def global_batch_size(cfg, mesh) -> int:
    d = cfg.data
    if int(d.batch_size) > 0:
        return int(d.batch_size)
    return int(d.per_device_batch_size) * mesh.devices.size


@dataclasses.dataclass
class Trainer:
    """Everything a training run needs besides data: the jitted step and its inputs."""

    state: train_state.TrainState
    train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    loss_fn: Callable
    optimizer: Any
    mask: optim.TrainableFilter
    mesh: jax.sharding.Mesh
    batch_spec: dict
    batch_shardings: dict
    global_batch_size: int
    model_step: Callable  # the same step without remat (for model FLOPs), taking states with...
    model_graphdef: Any  # ...this graphdef (``state.graphdef`` has the rematerialising classes)
    memo: dict = dataclasses.field(default_factory=dict)  # per compiled step: e.g. its FLOPs

    def put_batch(self, batch: Mapping[str, Any]) -> dict:
        """This process's rows of a batch (numpy) -> global, sharded ``jax.Array``s as the step takes
        them (keys of ``batch_spec`` only; ``index`` and other extras are dropped). Always feed the
        step this way: jit compiles again for numpy inputs after sharded ones."""
        out = {}
        for k, sharding in self.batch_shardings.items():
            if k not in batch:
                raise KeyError(f"the batch has no {k!r} (has {sorted(batch)}): wrong config.stage for this data?")
            out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        return out

    def lower(self, *, model_step: bool = False):
        """Lowers the train step (``model_step``: its remat-free twin) for the abstract state and
        batch, without compiling."""
        step_fn, state = self.train_step, self.state
        if model_step:
            step_fn, state = self.model_step, state.replace(graphdef=self.model_graphdef)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_shardings[k]) for k, v in self.batch_spec.items()}
        return step_fn.lower(train_state.abstract_like(state), batch)


# Jitted steps by everything their computation depends on, so a second run in the same process
# (a resume, a test) reuses the compilation instead of tracing and compiling again.
_STEP_CACHE: dict = {}


def _jitted_steps(cfg, state, mask, loss_cfg, tx, shardings, spec, mesh, stage):
    policy = cfg.model.get("remat", "none")
    key = (stage, state.graphdef, policy, loss_cfg, training_schedule(cfg), json.dumps(_plain(cfg.optimizer), sort_keys=True),
           tuple((k, v.shape, str(v.dtype)) for k, v in sorted(spec.items())), mesh, rules_from_config(cfg))
    if key not in _STEP_CACHE:
        loss_fn = make_loss_fn(loss_cfg, training_schedule(cfg))
        plain = train_state.jit_train_step(train_state.make_train_step(loss_fn, tx), state, shardings)
        step, graphdef = plain, state.graphdef
        if policy != "none":
            # Same parameters and paths, rematerialising graph: only the graphdef differs.
            remat_model = nnx.merge(state.graphdef, state.params, state.frozen)
            trained = ("reference_net", "denoiser") if stage == 1 else ("denoiser",)
            n = sum(apply_remat(getattr(remat_model, name), policy) for name in trained)
            log.info("remat %r on %d blocks of %s", policy, n, "/".join(trained))
            graphdef = nnx.split(remat_model, mask, ...)[0]
            step = train_state.jit_train_step(train_state.make_train_step(loss_fn, tx), state.replace(graphdef=graphdef),
                                              shardings)
        _STEP_CACHE[key] = (loss_fn, plain, step, state.graphdef, graphdef, {})
    return _STEP_CACHE[key]


def setup(cfg, *, mesh=None, model: AnimateAnyoneModel | None = None, abstract: bool = False) -> Trainer:
    """Model (``init_model`` unless given), trainable mask, optimizer, sharded train state and the
    jitted, donating train step for ``cfg.stage``. ``abstract``: the state as ``ShapeDtypeStruct``s
    with their shardings, nothing allocated (``Trainer.lower`` and FLOP counts at any size)."""
    stage = int(cfg.stage)
    mesh = mesh or mesh_from_config(cfg)
    rules = rules_from_config(cfg)
    if model is None:
        model = build_model(cfg, stage, abstract=True) if abstract else init_model(cfg, stage)
    tr = cfg.get("trainable", {}) or {}
    mask = trainable_filter(model, stage, tuple(tr.get("include", ())), tuple(tr.get("exclude", ())))
    tx = optim.make_optimizer(cfg.optimizer)
    frozen_dtype = cfg.model.get("frozen_dtype") or None
    if abstract:
        state = train_state.abstract_train_state(lambda: build_model(cfg, stage), tx, mask, mesh, rules, frozen_dtype)
    else:
        state = train_state.create_train_state(model, tx, mask, mesh, rules, frozen_dtype, rng=int(cfg.seed))
    loss_cfg = LossConfig.from_config(cfg.loss)
    gbs = global_batch_size(cfg, mesh)
    spec = batch_spec(stage, gbs, tuple(cfg.data.resolution), int(cfg.data.clip_size), int(cfg.data.get("n_frames", 1)),
                      bool(cfg.data.get("uint8_output", True)))
    shardings = batch_shardings(mesh, spec)
    loss_fn, plain, step, plain_graphdef, graphdef, memo = _jitted_steps(
        cfg, state, mask, loss_cfg, tx, shardings, spec, mesh, stage)
    state = state.replace(graphdef=graphdef)
    return Trainer(state, step, loss_fn, tx, mask, mesh, spec, shardings, gbs, plain, plain_graphdef, memo)


def _lowered_flops(lowered) -> float | None:
    try:
        ca = lowered.cost_analysis()
    except NotImplementedError:  # not every backend implements it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def flops_config(cfg):
    """``cfg`` as the FLOP count sees it: plain XLA attention, no remat. The fused (cuDNN) and
    chunked attentions hide their work from XLA's cost analysis (a custom call counts nothing; a
    loop body counts once), while the math, and so the model FLOPs, is the same."""
    from ml_collections import ConfigDict

    c = ConfigDict(cfg.to_dict())
    c.model.attention = "xla"
    c.model.remat = "none"
    return c


def step_flops(trainer: Trainer, cfg=None) -> float | None:
    """Model FLOPs of one global train step: XLA's cost analysis of the lowered step *without*
    remat (recomputation is not model work) and with plain XLA attention (``flops_config``), before
    SPMD partitioning, so it counts the whole global batch once (a compiled program's cost analysis
    describes one device's partition). The lowered count is within a few percent of the compiled
    one (which adds replicated work and removes dead code). Frozen parts count forward only by
    construction: autodiff emits no backward for them. Gradients wrt activations of frozen layers
    between the loss and a trained layer (stage 2: the whole denoiser) are real work and are
    counted. ``cfg``: the trainer's config; when its attention is not "xla" the count lowers an
    abstract twin of the step (tracing only, nothing allocated)."""
    if "flops" not in trainer.memo:
        if cfg is None or cfg.model.attention == "xla":
            flops = _lowered_flops(trainer.lower(model_step=True))
        else:
            flops = _lowered_flops(setup(flops_config(cfg), mesh=trainer.mesh, abstract=True).lower())
        trainer.memo["flops"] = flops
    return trainer.memo["flops"]


def compiled_flops(compiled) -> float | None:
    """FLOPs of a compiled program (one device's partition) from XLA's cost analysis; includes
    rematerialised recomputation. None when the backend gives none."""
    try:
        ca = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001 - a missing count must not stop the caller; it is told why
        log.warning("XLA cost analysis of the compiled step failed (%s: %s): no FLOP count", type(e).__name__, e)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


# --------------------------------------------------------------------------------------------
# Validation sampling
# --------------------------------------------------------------------------------------------


def sample_videos(model: AnimateAnyoneModel, reference, clip, poses, key, *, schedule: NoiseSchedule, num_steps: int,
                  guidance_scale: float) -> jax.Array:
    """DDIM with classifier-free guidance, one call per step on [uncond; cond] (Moore's inference:
    the unconditional branch has a zero CLIP token and no reference attention).

    ``reference`` (B, H, W, 3) in [-1, 1], ``clip`` (B, S, S, 3) uint8, ``poses`` (B, F, H, W, 3)
    in [0, 1] -> frames (B, F, H, W, 3) in [0, 1]. Jit it (``num_steps`` static)."""
    b, f = poses.shape[:2]
    context = model.image_context(clip)
    kv = model.reference(model.encode(reference), context)
    enabled = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    kv2 = [None if r is None else ReferenceKV(jnp.concatenate([r.k, r.k]), jnp.concatenate([r.v, r.v]), enabled) for r in kv]
    context2 = jnp.concatenate([jnp.zeros_like(context), context])
    pose = model.pose_features(poses)
    pose2 = jnp.concatenate([pose, pose])
    h, w = reference.shape[1:3]
    down = model.vae.config.downscale
    shape = (b, f, h // down, w // down, model.vae.config.latent_channels)
    x = jax.random.normal(key, shape, jnp.float32)
    timesteps = jnp.asarray(schedule.inference_timesteps(num_steps))

    def body(x, t):
        tt = jnp.broadcast_to(t, (2 * b,))
        pred = model.predict(jnp.concatenate([x, x]), tt, context2, reference=kv2, pose_features=pose2)
        uncond, cond = pred[:b], pred[b:]
        guided = uncond + guidance_scale * (cond - uncond)
        return ddim_step(schedule, guided, t, x, num_steps), None

    x, _ = jax.lax.scan(body, x, timesteps)
    return model.decode(x)


def _diffusion_field(cfg, name: str, default: str) -> str:
    d = cfg.get("diffusion", None) if cfg is not None else None
    return str(d.get(name, default)) if d is not None else default


def training_schedule(cfg=None) -> NoiseSchedule:
    """Moore's training schedule with ``cfg.diffusion``'s prediction type and betas."""
    return moore_training_schedule(prediction_type=_diffusion_field(cfg, "prediction_type", "v_prediction"),
                                   beta_schedule=_diffusion_field(cfg, "beta_schedule", "scaled_linear"))


def export_schedule(cfg=None) -> NoiseSchedule:
    """The inference schedule an export records (``cfg.diffusion.export_beta_schedule``)."""
    return validation_schedule(_diffusion_field(cfg, "export_beta_schedule", "linear"), cfg)


def validation_schedule(beta_schedule: str = "linear", cfg=None) -> NoiseSchedule:
    """Moore's inference schedule with these betas and ``cfg.diffusion``'s prediction type."""
    return moore_inference_schedule(beta_schedule=beta_schedule,
                                    prediction_type=_diffusion_field(cfg, "prediction_type", "v_prediction"))
