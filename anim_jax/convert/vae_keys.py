"""diffusers ``AutoencoderKL`` state-dict keys <-> ``anim_jax.models.vae.AutoencoderKL``.

The NNX paths already are the diffusers keys (``encoder.down_blocks.0.resnets.0.conv1.weight``, ...)
except the mid-block attention's output projection, which diffusers keeps in a list (``to_out.0``).

Old diffusers checkpoints (e.g. ``sd-vae-ft-mse/diffusion_pytorch_model.bin``) name the mid-block
attention ``query``/``key``/``value``/``proj_attn``; ``rename_legacy_vae_keys`` renames them the way
diffusers' ``_convert_deprecated_attention_blocks`` does (the tensors have the same shapes).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from anim_jax.convert.loader import load_torch_state_dict
from anim_jax.convert.mapping import KeyMap

VAE_KEYMAP = KeyMap(renames=((r"\.attentions\.(\d+)\.to_out\.", r".attentions.\1.to_out.0."),))

_LEGACY = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_vae_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A copy of ``state_dict`` with legacy mid-block attention names replaced by the current ones.

    Current keys pass through untouched, so this is safe on any diffusers VAE state dict.
    """
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY.match(key)
        new = f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key
        if new in out:
            raise ValueError(f"VAE state dict has both the legacy and the current name for {new}")
        out[new] = value
    return out


def load_vae_state_dict(model, state_dict: Mapping[str, np.ndarray], *, source: str = "VAE checkpoint", dtype=None):
    """Strictly loads a diffusers ``AutoencoderKL`` state dict (current or legacy names) into ``model``."""
    return load_torch_state_dict(model, rename_legacy_vae_keys(state_dict), VAE_KEYMAP, source=source, dtype=dtype)
