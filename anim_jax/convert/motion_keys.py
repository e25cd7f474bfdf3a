"""AnimateDiff motion-module state-dict keys, in both checkpoint formats.

**Original** (AnimateDiff ``mm_sd_v15*.ckpt``, Moore-AnimateAnyone ``motion_module.pth``), 28 tensors per
module with two attention blocks (C = channels)::

    <prefix>.temporal_transformer.norm.{weight,bias}                                    (C,)
    <prefix>.temporal_transformer.proj_in.{weight,bias}                                 (C,C) / (C,)
    <prefix>.temporal_transformer.transformer_blocks.{t}.attention_blocks.{k}.to_{q,k,v}.weight   (C,C)
    <prefix>.temporal_transformer.transformer_blocks.{t}.attention_blocks.{k}.to_out.0.{weight,bias}
    <prefix>.temporal_transformer.transformer_blocks.{t}.attention_blocks.{k}.pos_encoder.pe   (1,max_len,C) buffer
    <prefix>.temporal_transformer.transformer_blocks.{t}.norms.{k}.{weight,bias}        (C,)
    <prefix>.temporal_transformer.transformer_blocks.{t}.ff.net.0.proj.{weight,bias}    (8C,C) / (8C,)
    <prefix>.temporal_transformer.transformer_blocks.{t}.ff.net.2.{weight,bias}         (C,4C) / (C,)
    <prefix>.temporal_transformer.transformer_blocks.{t}.ff_norm.{weight,bias}          (C,)
    <prefix>.temporal_transformer.proj_out.{weight,bias}                                (C,C) / (C,)

**diffusers** ``MotionAdapter`` (checked by instantiating it, diffusers 0.42), 27 tensors per module::

    <prefix>.norm / proj_in / proj_out                       (no ``temporal_transformer.``)
    <prefix>.transformer_blocks.{t}.attn{1,2}.to_{q,k,v}.weight, attn{1,2}.to_out.0.{weight,bias}
    <prefix>.transformer_blocks.{t}.norm{1,2}  (original norms.{0,1}),  norm3  (original ff_norm)
    <prefix>.transformer_blocks.{t}.ff.net.0.proj, ff.net.2
    <prefix>.transformer_blocks.{t}.pos_embed.pe             ONE buffer per transformer block, shared by
                                                             attn1 and attn2 (the original has one per
                                                             attention block; the values are identical)

The prefixes are the same in both formats: ``down_blocks.{i}.motion_modules.{0,1}``,
``mid_block.motion_modules.0`` and ``up_blocks.{i}.motion_modules.{0,1,2}`` (a diffusers adapter built
with ``conv_in_channels`` also has ``conv_in.{weight,bias}``, which is not a motion module).

Our NNX ``MotionModule`` is named like the original format, except that it does not keep the
container indices ``to_out.0`` / ``ff.net.0.proj`` / ``ff.net.2`` (NNX names ``to_out``, ``ff.proj``,
``ff.out``); the regexes below put them back. All renames are scoped to paths that contain
``temporal_transformer.``, so the maps compose with a UNet's own key map.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np

from anim_jax.convert.mapping import KeyMap

_TT = r"temporal_transformer\.transformer_blocks\.\d+\."

# NNX path -> original key (the leaf kernel/scale -> weight rename is done by mapping.torch_key).
MOTION_KEYMAP_ORIGINAL = KeyMap(
    renames=(
        (rf"({_TT}attention_blocks\.\d+\.to_out)\.(kernel|bias)$", r"\1.0.\2"),
        (rf"({_TT}ff)\.proj\.", r"\1.net.0.proj."),
        (rf"({_TT}ff)\.out\.", r"\1.net.2."),
    ),
    # Deterministic buffers, recomputed by the model; validate them with models.motion.check_pe_buffers.
    ignored=(rf"(^|\.){_TT}attention_blocks\.\d+\.pos_encoder\.pe$",),
)

# Original key (or NNX path after the original renames) -> diffusers key. Applied in order; the
# last one drops the ``temporal_transformer.`` level.
_ORIGINAL_TO_DIFFUSERS = (
    (rf"({_TT})attention_blocks\.0\.", r"\1attn1."),
    (rf"({_TT})attention_blocks\.1\.", r"\1attn2."),
    (rf"({_TT})norms\.0\.", r"\1norm1."),
    (rf"({_TT})norms\.1\.", r"\1norm2."),
    (rf"({_TT})ff_norm\.", r"\1norm3."),
    (r"(^|\.)temporal_transformer\.", r"\1"),
)

MOTION_KEYMAP_DIFFUSERS = KeyMap(
    renames=tuple(MOTION_KEYMAP_ORIGINAL.renames) + _ORIGINAL_TO_DIFFUSERS,
    ignored=(r"(^|\.)transformer_blocks\.\d+\.pos_embed\.pe$",),
)

# ---------------------------------------------------------------------------------------------------
# Whole state dicts (adapters, UNets): module prefixes, channels, format conversion.

_PREFIX = re.compile(r"^(.*?motion_modules\.\d+)\.")
_ORIG_PE = re.compile(r"^(.*?)temporal_transformer\.(transformer_blocks\.\d+)\.attention_blocks\.(\d+)\.pos_encoder\.pe$")
# A diffusers motion-module key: optional ``<...>.motion_modules.<j>.`` prefix, then the module's own key.
_DIFF_KEY = re.compile(r"^((?:.*\.)?motion_modules\.\d+\.|)(norm|proj_in|proj_out|transformer_blocks)\.(.*)$")
_DIFF_BLOCK = re.compile(r"^(\d+)\.(attn(\d+)|norm([123])|ff|pos_embed)\.(.*)$")


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def motion_module_prefixes(state_dict_keys: Iterable[str]) -> list[str]:
    """The distinct ``...motion_modules.<j>`` prefixes, e.g. ``down_blocks.0.motion_modules.0``.

    Sorted naturally (``down_blocks.2`` before ``down_blocks.10``); keys of either format, and keys
    that are not motion-module keys are skipped, so a whole UNet state dict works too.
    """
    found = {m[1] for k in state_dict_keys if (m := _PREFIX.match(k))}
    return sorted(found, key=_natural_key)


def motion_module_channels(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """``{prefix: channels}`` from each module's ``proj_in.weight`` (out, in) shape (either format)."""
    out = {}
    for prefix in motion_module_prefixes(shapes):
        for key in (f"{prefix}.temporal_transformer.proj_in.weight", f"{prefix}.proj_in.weight"):
            if key in shapes:
                out[prefix] = int(tuple(shapes[key])[1])
                break
        else:
            raise ValueError(f"motion module {prefix!r} has no proj_in.weight, so its channel count is unknown")
    return out


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def original_to_diffusers_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original AnimateDiff/Moore motion-module keys -> diffusers ``MotionAdapter`` keys.

    The per-attention-block ``pos_encoder.pe`` copies of one transformer block become its single
    ``pos_embed.pe``; they must be identical. Keys without ``temporal_transformer.`` pass through.
    """
    out: dict[str, np.ndarray] = {}
    pes: dict[str, list[tuple[str, np.ndarray]]] = defaultdict(list)
    for key, value in state_dict.items():
        if m := _ORIG_PE.match(key):
            pes[f"{m[1]}{m[2]}.pos_embed.pe"].append((key, value))
            continue
        if "temporal_transformer." not in key:
            new = key
        else:
            new = _rename(key, _ORIGINAL_TO_DIFFUSERS)
            if "attention_blocks." in new or "norms." in new:
                raise ValueError(
                    f"{key}: the diffusers MotionAdapter format has exactly two attention blocks "
                    "(attn1, attn2); this checkpoint has more"
                )
        if new in out:
            raise ValueError(f"two keys map to the diffusers key {new}")
        out[new] = value
    for new, copies in pes.items():
        first_key, first = copies[0]
        for key, value in copies[1:]:
            if np.shape(value) != np.shape(first) or not np.array_equal(np.asarray(value), np.asarray(first)):
                raise ValueError(f"{key} differs from {first_key}; diffusers keeps one pos_embed.pe per block")
        out[new] = first
    return out


def diffusers_to_original_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers ``MotionAdapter`` keys -> original AnimateDiff/Moore keys (the inverse of the above).

    A block's ``pos_embed.pe`` is written once per attention block of that block (``attention_blocks.
    {k}.pos_encoder.pe``), as the original stores it. Keys that are not motion-module keys (e.g. an
    adapter's ``conv_in``) pass through unchanged.
    """
    out: dict[str, np.ndarray] = {}
    attn_per_block: dict[str, set[int]] = defaultdict(set)
    pe_per_block: dict[str, tuple[str, np.ndarray]] = {}
    names = {"1": "norms.0", "2": "norms.1", "3": "ff_norm"}
    for key, value in state_dict.items():
        m = _DIFF_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, head, rest = m[1], m[2], m[3]
        base = f"{prefix}temporal_transformer."
        if head != "transformer_blocks":
            new = f"{base}{head}.{rest}"
        else:
            b = _DIFF_BLOCK.match(rest)
            if b is None:
                raise ValueError(f"{key}: not a key of a diffusers motion-module transformer block")
            block, what, leaf = b[1], b[2], b[5]
            block_path = f"{base}transformer_blocks.{block}."
            if b[3] is not None:
                k = int(b[3]) - 1
                attn_per_block[block_path].add(k)
                new = f"{block_path}attention_blocks.{k}.{leaf}"
            elif b[4] is not None:
                new = f"{block_path}{names[b[4]]}.{leaf}"
            elif what == "ff":
                new = f"{block_path}ff.{leaf}"
            else:
                if leaf != "pe":
                    raise ValueError(f"{key}: unknown positional-embedding tensor")
                pe_per_block[block_path] = (key, value)
                continue
        if new in out:
            raise ValueError(f"two keys map to the original key {new}")
        out[new] = value
    for block_path, (key, value) in pe_per_block.items():
        if not attn_per_block[block_path]:
            raise ValueError(f"{key}: a positional embedding for a block without attention layers")
        for k in sorted(attn_per_block[block_path]):
            out[f"{block_path}attention_blocks.{k}.pos_encoder.pe"] = value
    return out
