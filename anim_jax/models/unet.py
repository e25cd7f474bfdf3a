"""The Stable Diffusion 1.5 UNet (diffusers ``UNet2DConditionModel``) in Flax NNX: Animate Anyone's
denoiser and, with ``reference_net=True``, its ReferenceNet.

Module and parameter names mirror diffusers, so ``anim_jax.convert.unet_keys.UNET_KEYMAP`` maps
every parameter to exactly the diffusers state-dict key.

With ``UNetConfig.motion`` set, the UNet is the denoiser "UNet3D" (Moore-AnimateAnyone's
``UNet3DConditionModel``, from AnimateDiff): the same 2-D layers applied per frame, plus AnimateDiff
motion modules (``anim_jax.models.motion``) at the configured levels, in nnx.Lists named
``down_blocks.{i}.motion_modules.{j}``, ``mid_block.motion_modules.0`` and
``up_blocks.{i}.motion_modules.{j}`` like the PyTorch keys
(``anim_jax.convert.unet_keys.DENOISER_KEYMAP``).

Video convention: frames are folded into the batch, ``sample`` is ``(B*F, H, W, C)`` with row
``b*F + f``. The time embedding, the cross-attention context and the reference features are per
video (leading batch B, or 1 for "shared by all") and broadcast to the frames inside.

Reference attention (see ``anim_jax.models.transformer``) is explicit data flow: the ReferenceNet
returns its transformer blocks' ``norm1`` outputs by block path; the denoiser takes their projections
(``reference_kv``) as ``reference=``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models import layers, remat
from anim_jax.models.attention_ops import AttentionConfig
from anim_jax.models.motion import MotionConfig, MotionModule
from anim_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, frame_group_norm
from anim_jax.models.transformer import BasicTransformerBlock, Reference, ReferenceKV, Transformer2DModel

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)


# ------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture. Defaults are diffusers' ``UNet2DConditionModel`` defaults (SD1.5's
    ``unet/config.json`` differs only in ``cross_attention_dim=768``)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    # Number of attention heads per down block (an int means the same for all). diffusers calls
    # this ``attention_head_dim`` in config.json: the legacy name, whose value is the head COUNT.
    num_attention_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 1280
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False  # proj_in/proj_out: Linear (True) or 1x1 conv (False)
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    transformer_layers_per_block: int = 1
    # Ours, not diffusers': ResNet GroupNorms and conv_norm_out pool their statistics over the F
    # frames of a video (the original UNet3D's non-inflated 5-D GroupNorm, used in stage 1);
    # False: per frame (``use_inflated_groupnorm=True``, stage 2 and inference). Transformer
    # GroupNorms are always per frame.
    groupnorm_over_frames: bool = False
    # Ours: round reference tokens to float16 and back before the denoiser uses them. The PyTorch
    # original copies its reference bank with ``.to(torch.float16)`` (ReferenceAttentionControl's
    # default dtype) even in fp32 runs; the rounding changes outputs measurably.
    reference_fp16_rounding: bool = True
    # Ours: AnimateDiff motion modules (the denoiser UNet3D); None: a plain 2-D UNet. Placement:
    # ``motion.levels`` (level i = down block i and the up block at the same resolution, one module
    # after each layer) and ``motion.use_mid_block`` (between the mid block's attention and its
    # second resnet).
    motion: MotionConfig | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        heads = self.num_attention_heads
        heads = (heads,) * n if isinstance(heads, int) else tuple(heads)
        object.__setattr__(self, "num_attention_heads", heads)
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, value in (("down_block_types", self.down_block_types), ("up_block_types", self.up_block_types),
                            ("num_attention_heads", heads)):
            if len(value) != n:
                raise ValueError(f"UNetConfig.{name} has {len(value)} entries, block_out_channels has {n}")
        for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                     ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"UNetConfig.{name}: unsupported block type(s) {bad}; supported: {allowed}")
        if self.motion is not None:
            if not isinstance(self.motion, MotionConfig):
                raise TypeError(f"UNetConfig.motion must be a MotionConfig or None, got {type(self.motion).__name__}")
            beyond = [v for v in self.motion.levels if v >= n]
            if beyond:
                raise ValueError(f"UNetConfig.motion.levels={self.motion.levels}: this UNet has only levels 0..{n - 1}")





# ------------------------------------------------------------------------------------------------
# Blocks


@dataclasses.dataclass(frozen=True)
class _Parts:
    """Settings shared by every resnet and transformer of one UNet, and their factories."""

    temb_channels: int
    groups: int
    eps: float
    groupnorm_over_frames: bool
    context_dim: int
    use_linear_projection: bool
    transformer_layers: int
    attention: AttentionConfig
    dtype: Any
    param_dtype: Any
    motion: MotionConfig | None = None

    def resnet(self, cin: int, cout: int, rngs: nnx.Rngs) -> ResnetBlock2D:
        return ResnetBlock2D(
            cin, cout, self.temb_channels, groups=self.groups, eps=self.eps,
            groupnorm_over_frames=self.groupnorm_over_frames, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
        )

    def transformer(self, channels: int, heads: int, rngs: nnx.Rngs) -> Transformer2DModel:
        return Transformer2DModel(
            channels, heads=heads, dim_head=channels // heads, context_dim=self.context_dim,
            num_layers=self.transformer_layers, groups=self.groups, use_linear_projection=self.use_linear_projection,
            attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs,
        )

    def sampler(self, cls, channels: int, rngs: nnx.Rngs):
        return cls(channels, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

    def motion_modules(self, channels: int, count: int, enabled: bool, rngs: nnx.Rngs) -> nnx.List:
        """``count`` motion modules, or an empty list where this UNet has none."""
        if self.motion is None or not enabled:
            return nnx.List([])
        return nnx.List([
            MotionModule(channels, self.motion, dtype=self.dtype, param_dtype=self.param_dtype,
                         attention=self.attention, rngs=rngs)
            for _ in range(count)
        ])


@jax.custom_jvp
def round_to_float16(x: jax.Array) -> jax.Array:
    """``x`` rounded to float16 and back (the reference bank's rounding), with a straight-through
    gradient. Differentiating the casts would round the cotangent to float16 too, and a training
    step's per-element cotangents there (~1e-8 and below at batch 8) underflow to zero: the
    ReferenceNet stopped learning after ~100 steps of the demo's training. Moore's fp16 training
    avoids the same underflow with a loss scale; fp32 training needs neither."""
    return x.astype(jnp.float16).astype(x.dtype)


@round_to_float16.defjvp
def _round_to_float16_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return round_to_float16(x), t


def _apply_motion(module: MotionModule, h: jax.Array, num_frames: int) -> jax.Array:
    """A motion module on frames folded into the batch: (B*F, H, W, C) -> (B, F, H, W, C) -> back."""
    n = h.shape[0]
    return remat.call(module, h.reshape((n // num_frames, num_frames) + h.shape[1:])).reshape(h.shape)


def _sub(refs: Mapping[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    """The entries of a path-keyed dict under ``prefix.``, keyed by the rest of their path."""
    if refs is None:
        return None
    p = prefix + "."
    return {k[len(p):]: v for k, v in refs.items() if k.startswith(p)}


def _prefixed(prefix: str, feats: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in feats.items()}


class _Block(nnx.Module):
    """A UNet level: ``resnets``, ``attentions`` and ``motion_modules`` (nnx.Lists; ``attentions``
    is empty for the non-attention block types, ``motion_modules`` where the level has none)."""

    def _layer(self, i, h, temb, context, num_frames, reference):
        """Layer i of a down/up block, in AnimateDiff's order: resnet, attention (if any), motion
        module (if any). Returns (h, {path under this block: reference features})."""
        h = remat.call(self.resnets[i], h, temb, num_frames=num_frames)
        feats = {}
        if self.attentions:
            h, f = remat.call(self.attentions[i], h, context, _sub(reference, f"attentions.{i}"), num_frames=num_frames)
            feats = _prefixed(f"attentions.{i}", f)
        if self.motion_modules:
            h = _apply_motion(self.motion_modules[i], h, num_frames)
        return h, feats


class _DownBlock(_Block):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, heads: int | None,
                 add_downsample: bool, parts: _Parts, rngs: nnx.Rngs, motion: bool = False):
        self.resnets = nnx.List(
            [parts.resnet(in_channels if i == 0 else out_channels, out_channels, rngs) for i in range(num_layers)]
        )
        self.attentions = nnx.List([parts.transformer(out_channels, heads, rngs) for _ in range(num_layers)] if heads else [])
        self.motion_modules = parts.motion_modules(out_channels, num_layers, motion, rngs)
        self.downsamplers = nnx.List([parts.sampler(Downsample2D, out_channels, rngs)] if add_downsample else [])

    def __call__(self, h, temb, context, *, num_frames=1, reference=None):
        """``reference``: {path under this block: ReferenceKV}. Returns (h, skip connections,
        {path under this block: reference features})."""
        skips, feats = [], {}
        for i in range(len(self.resnets)):
            h, f = self._layer(i, h, temb, context, num_frames, reference)
            skips.append(h)
            feats.update(f)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips, feats


class CrossAttnDownBlock2D(_DownBlock):
    """(resnet -> transformer [-> motion module]) x num_layers -> downsample."""


class DownBlock2D(_DownBlock):
    """(resnet [-> motion module]) x num_layers -> downsample."""

    def __init__(self, in_channels, out_channels, *, num_layers, add_downsample, parts, rngs, motion=False):
        super().__init__(in_channels, out_channels, num_layers=num_layers, heads=None,
                         add_downsample=add_downsample, parts=parts, rngs=rngs, motion=motion)


class _UpBlock(_Block):
    def __init__(self, in_channels: int, out_channels: int, prev_output_channels: int, *, num_layers: int,
                 heads: int | None, add_upsample: bool, parts: _Parts, rngs: nnx.Rngs, motion: bool = False):
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            cin = prev_output_channels if i == 0 else out_channels
            resnets.append(parts.resnet(cin + skip, out_channels, rngs))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([parts.transformer(out_channels, heads, rngs) for _ in range(num_layers)] if heads else [])
        self.motion_modules = parts.motion_modules(out_channels, num_layers, motion, rngs)
        self.upsamplers = nnx.List([parts.sampler(Upsample2D, out_channels, rngs)] if add_upsample else [])

    def __call__(self, h, skips, temb, context, *, num_frames=1, reference=None, upsample_hw=None):
        """``skips``: this block's skip connections (one per resnet), consumed last first;
        ``upsample_hw``: the size to upsample to (the next skip connection's). Returns (h, features)."""
        feats = {}
        for i in range(len(self.resnets)):
            h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
            h, f = self._layer(i, h, temb, context, num_frames, reference)
            feats.update(f)
        for up in self.upsamplers:
            h = up(h, upsample_hw)
        return h, feats


class CrossAttnUpBlock2D(_UpBlock):
    """(concat skip -> resnet -> transformer [-> motion module]) x num_layers -> upsample."""


class UpBlock2D(_UpBlock):
    """(concat skip -> resnet [-> motion module]) x num_layers -> upsample."""

    def __init__(self, in_channels, out_channels, prev_output_channels, *, num_layers, add_upsample, parts, rngs,
                 motion=False):
        super().__init__(in_channels, out_channels, prev_output_channels, num_layers=num_layers, heads=None,
                         add_upsample=add_upsample, parts=parts, rngs=rngs, motion=motion)


class UNetMidBlock2DCrossAttn(_Block):
    """resnet 0 -> (transformer i [-> motion module i] -> resnet i+1) for each attention (one in
    SD1.5); the motion module is AnimateDiff v2's mid-block module."""

    def __init__(self, channels: int, *, heads: int, parts: _Parts, rngs: nnx.Rngs, num_layers: int = 1,
                 motion: bool = False):
        self.resnets = nnx.List([parts.resnet(channels, channels, rngs) for _ in range(num_layers + 1)])
        self.attentions = nnx.List([parts.transformer(channels, heads, rngs) for _ in range(num_layers)])
        self.motion_modules = parts.motion_modules(channels, num_layers, motion, rngs)

    def __call__(self, h, temb, context, *, num_frames=1, reference=None):
        h = remat.call(self.resnets[0], h, temb, num_frames=num_frames)
        feats = {}
        for i, attention in enumerate(self.attentions):
            h, f = remat.call(attention, h, context, _sub(reference, f"attentions.{i}"), num_frames=num_frames)
            if self.motion_modules:
                h = _apply_motion(self.motion_modules[i], h, num_frames)
            h = remat.call(self.resnets[i + 1], h, temb, num_frames=num_frames)
            feats.update(_prefixed(f"attentions.{i}", f))
        return h, feats


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_features: int, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = layers.Linear(in_features, dim, axes=("embed", "mlp"), **kw)
        self.linear_2 = layers.Linear(dim, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


# ------------------------------------------------------------------------------------------------
# The UNet


class UNet2DConditionModel(nnx.Module):
    """SD1.5 UNet (denoiser) or, with ``reference_net=True``, Animate Anyone's ReferenceNet. With
    ``config.motion`` it is the video denoiser (UNet3D): motion modules run over the frames of
    each video, so ``num_frames`` must then be the true frame count of the window (at most
    ``motion.temporal_position_encoding_max_len``).

    ``model(sample, timesteps, context, *, num_frames=1, reference=None, pose_features=None)``:

    * ``sample`` (N, H, W, C_in), N = B * num_frames, frame-major inside each video (row b*F + f).
      Any H, W: upsampling goes to the skip connection's exact size (98x64 latents -> 13x8 at the
      bottom -> back), with PyTorch's floor nearest indexing.
    * ``timesteps``: scalar or (B,); the time embedding is shared by the frames of a video.
    * ``context`` (B, L, D): cross-attention tokens per video (B may be 1: shared by all videos).
    * ``pose_features`` (N, H, W, C0): added right after ``conv_in`` (Animate Anyone's pose
      injection).
    * ``reference``: None (plain self-attention) or ``{block path: ReferenceKV or None}`` with an
      entry for every transformer block (None: that block does plain self-attention), as
      ``reference_kv`` returns it from a ReferenceNet's features. In each block's ``attn1`` the
      keys/values are ``concat([frame tokens, reference tokens], axis=1)`` through that block's own
      ``attn1`` weights, the reference shared by the F frames of its video. With
      ``config.reference_fp16_rounding`` ``reference_kv`` rounds the tokens to float16 first.

    Returns the prediction (N, H, W, C_out); a ReferenceNet returns instead every transformer
    block's ``norm1`` output (its self-attention input), each (N, H*W, C), keyed by the block's
    path (``named_transformer_blocks``), e.g. at SD1.5 size the 16 paths
      down_blocks.{0,1,2}.attentions.{0,1}.transformer_blocks.0   (320/640/1280, latent/1, /2, /4)
      mid_block.attentions.0.transformer_blocks.0                 (1280, /8)
      up_blocks.{1,2,3}.attentions.{0,1,2}.transformer_blocks.0   (1280/640/320, /4, /2, /1)
    in module order = call order. The PyTorch original pairs denoiser and ReferenceNet blocks by
    sorting both lists by width (stable) and zipping; since the two nets have the same structure
    that pairing is location-to-location, i.e. "the same path".

    A ReferenceNet has no ``conv_norm_out``/``conv_out`` (682 tensors at SD1.5 size). Its last
    transformer block's work after ``norm1`` (and the rest of the net after it) does not feed
    the output; under ``jax.jit`` XLA removes it.
    """

    def __init__(
        self,
        config: UNetConfig,
        *,
        reference_net: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention: AttentionConfig = AttentionConfig(),
        rngs: nnx.Rngs,
    ):
        c = config
        ch = c.block_out_channels
        n = len(ch)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        parts = _Parts(
            temb_channels=4 * ch[0], groups=c.norm_num_groups, eps=c.norm_eps,
            groupnorm_over_frames=c.groupnorm_over_frames, context_dim=c.cross_attention_dim,
            use_linear_projection=c.use_linear_projection, transformer_layers=c.transformer_layers_per_block,
            attention=attention, dtype=dtype, param_dtype=param_dtype, motion=c.motion,
        )
        if reference_net and c.motion is not None:
            raise ValueError("a ReferenceNet is a 2-D UNet; its UNetConfig must have motion=None")
        self.config = config
        self.reference_net = reference_net
        self.dtype = dtype
        motion_levels = set(c.motion.levels) if c.motion is not None else set()

        self.conv_in = layers.Conv2d(c.in_channels, ch[0], 3, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0], **kw)

        down, out_ch = [], ch[0]
        for i, kind in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            common = dict(num_layers=c.layers_per_block, add_downsample=i < n - 1, parts=parts, rngs=rngs,
                          motion=i in motion_levels)
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(in_ch, out_ch, heads=c.num_attention_heads[i], **common))
            else:
                down.append(DownBlock2D(in_ch, out_ch, **common))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlock2DCrossAttn(
            ch[-1], heads=c.num_attention_heads[-1], parts=parts, rngs=rngs,
            motion=c.motion is not None and c.motion.use_mid_block,
        )

        rev_ch, rev_heads = ch[::-1], c.num_attention_heads[::-1]
        up, out_ch = [], rev_ch[0]
        for i, kind in enumerate(c.up_block_types):
            prev_ch, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, n - 1)]
            common = dict(num_layers=c.layers_per_block + 1, add_upsample=i < n - 1, parts=parts, rngs=rngs,
                          motion=n - 1 - i in motion_levels)  # up block i is at level n-1-i
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(in_ch, out_ch, prev_ch, heads=rev_heads[i], **common))
            else:
                up.append(UpBlock2D(in_ch, out_ch, prev_ch, **common))
        self.up_blocks = nnx.List(up)

        if reference_net:
            self.conv_norm_out = self.conv_out = None
        else:
            self.conv_norm_out = layers.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps, param_dtype=param_dtype)
            self.conv_out = layers.Conv2d(ch[0], c.out_channels, 3, **kw)

    # -- reference features ----------------------------------------------------------------------

    def _levels(self) -> list[tuple[str, _Block]]:
        return [*((f"down_blocks.{i}", b) for i, b in enumerate(self.down_blocks)), ("mid_block", self.mid_block),
                *((f"up_blocks.{i}", b) for i, b in enumerate(self.up_blocks))]

    def named_transformer_blocks(self) -> dict[str, BasicTransformerBlock]:
        """Every BasicTransformerBlock by its path (the keys of the reference features), in module
        order = call order."""
        return {
            f"{name}.attentions.{a}.transformer_blocks.{j}": block
            for name, level in self._levels()
            for a, attn in enumerate(level.attentions)
            for j, block in enumerate(attn.transformer_blocks)
        }

    def transformer_blocks(self) -> Iterator[BasicTransformerBlock]:
        """Every BasicTransformerBlock in module order."""
        yield from self.named_transformer_blocks().values()

    @property
    def num_transformer_blocks(self) -> int:
        return len(self.named_transformer_blocks())

    def _check_reference_keys(self, reference: Mapping[str, Any]) -> None:
        paths = self.named_transformer_blocks()
        if set(reference) != set(paths):
            missing = sorted(set(paths) - set(reference))
            unknown = sorted(set(reference) - set(paths))
            raise ValueError(
                f"reference has {len(reference)} entries; this UNet has {len(paths)} transformer blocks "
                f"(missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, unknown {unknown[:4]}"
                f"{' ...' if len(unknown) > 4 else ''}); entries are keyed by block path"
            )

    def reference_kv(self, tokens: Mapping[str, jax.Array | None]) -> dict[str, ReferenceKV | None]:
        """A ReferenceNet's features (``{block path: tokens (B or 1, Lr, C)}``) -> the denoiser's
        reference keys/values, projected once through each block's ``attn1.to_k``/``to_v`` (after
        the fp16 rounding, if configured). This is the only form the denoiser takes: across
        timesteps and context windows it saves the projections."""
        self._check_reference_keys(tokens)
        out = {}
        for path, block in self.named_transformer_blocks().items():
            r = tokens[path]
            if r is not None and self.config.reference_fp16_rounding:
                r = round_to_float16(r)
            out[path] = None if r is None else block.attn1.project_kv(r)
        return out

    # -- forward -----------------------------------------------------------------------------------

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float,
        context: jax.Array,
        *,
        num_frames: int = 1,
        reference: Mapping[str, Reference] | None = None,
        pose_features: jax.Array | None = None,
    ):
        c = self.config
        n = sample.shape[0]
        if n % num_frames:
            raise ValueError(f"sample batch {n} is not a multiple of num_frames={num_frames}")
        if self.reference_net and reference is not None:
            raise ValueError("a ReferenceNet produces reference features; it does not take them")
        b = n // num_frames
        m = c.motion
        if m is not None and m.temporal_position_encoding and num_frames > m.temporal_position_encoding_max_len:
            raise ValueError(
                f"UNet3D: num_frames={num_frames} is longer than the motion modules' position encoding "
                f"(motion.temporal_position_encoding_max_len={m.temporal_position_encoding_max_len}); "
                "use context windows of at most that many frames"
            )

        t = jnp.reshape(jnp.asarray(timesteps), (-1,))
        if t.shape[0] not in (1, b):
            raise ValueError(f"timesteps must be a scalar or one per video ({b}); got shape {jnp.shape(timesteps)}")
        t = jnp.broadcast_to(t, (b,))
        temb = layers.timestep_embedding(
            t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos, downscale_freq_shift=c.freq_shift
        )
        temb = jnp.repeat(self.time_embedding(temb.astype(self.dtype)), num_frames, axis=0)
        context = context.astype(self.dtype)

        h = self.conv_in(sample.astype(self.dtype))
        if pose_features is not None:
            h = h + pose_features.astype(h.dtype)

        if reference is not None:
            self._check_reference_keys(reference)
        feats = {}
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            h, s, f = block(h, temb, context, num_frames=num_frames, reference=_sub(reference, f"down_blocks.{i}"))
            skips += s
            feats.update(_prefixed(f"down_blocks.{i}", f))
        h, f = self.mid_block(h, temb, context, num_frames=num_frames, reference=_sub(reference, "mid_block"))
        feats.update(_prefixed("mid_block", f))
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            upsample_hw = skips[-1].shape[1:3] if skips else None
            h, f = block(h, block_skips, temb, context, num_frames=num_frames, reference=_sub(reference, f"up_blocks.{i}"),
                         upsample_hw=upsample_hw)
            feats.update(_prefixed(f"up_blocks.{i}", f))

        if self.reference_net:
            return feats
        h = jax.nn.silu(frame_group_norm(self.conv_norm_out, h, num_frames, c.groupnorm_over_frames))
        return self.conv_out(h)
