"""PoseGuider (Moore-AnimateAnyone ``src/models/pose_guider.py``) in Flax NNX, channels-last.

Eight 3x3 convs (SiLU after all but the last): ``conv_in`` 3->c0, then for each pair of channels
(c_i, c_{i+1}) a stride-1 conv c_i->c_i and a stride-2 conv c_i->c_{i+1}, then ``conv_out``
c_last->320, zero-initialised so a fresh guider adds nothing to the UNet's ``conv_in`` output.
Pose renders (..., H, W, 3) in [0, 1] -> (..., H/8, W/8, 320) for four channel levels; any
leading axes (a video's (B, F)) are convolved frame by frame, like the original's InflatedConv3d.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from anim_jax.models.layers import Conv2d, Dtype


class PoseGuider(nnx.Module):
    def __init__(
        self,
        conditioning_embedding_channels: int = 320,
        block_out_channels: Sequence[int] = (16, 32, 96, 256),
        *,
        conditioning_channels: int = 3,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        ch = tuple(block_out_channels)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_in = Conv2d(conditioning_channels, ch[0], 3, **kw)
        blocks = []
        for cin, cout in zip(ch[:-1], ch[1:]):
            blocks.append(Conv2d(cin, cin, 3, **kw))
            blocks.append(Conv2d(cin, cout, 3, stride=2, **kw))
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv2d(ch[-1], conditioning_embedding_channels, 3, **kw)
        # zero_module(conv_out), as in the original: a new guider contributes exactly zero.
        self.conv_out.kernel[...] = jnp.zeros_like(self.conv_out.kernel[...])
        self.conv_out.bias[...] = jnp.zeros_like(self.conv_out.bias[...])

    def __call__(self, pose: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(pose))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)
