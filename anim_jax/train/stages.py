"""What a training stage trains, as data: regexes on parameter paths from ``config.trainable``.

``include``/``exclude`` may name ``{last_up_block}``, the index of the ReferenceNet's last up
block (stage 1 freezes it: only its first transformer's ``norm1`` output reaches the loss, the
rest of it never gets a gradient).
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from anim_jax.models.animate_anyone import AnimateAnyone
from anim_jax.train import optim


def last_up_block(model: AnimateAnyone) -> int:
    return len(model.reference_net.up_blocks) - 1


def trainable_filter(model: AnimateAnyone, include: Sequence[str], exclude: Sequence[str] = ()) -> optim.TrainableFilter:
    """The trainable mask: parameters whose path matches an ``include`` regex and no ``exclude``
    regex, after substituting ``{last_up_block}``. A pattern that matches nothing is an error."""
    if not include:
        raise ValueError("config.trainable.include is empty: nothing would train (see configs/stage1.py)")
    names = dict(last_up_block=last_up_block(model))
    fill = lambda patterns: tuple(p.replace("{last_up_block}", str(names["last_up_block"])) for p in patterns)
    mask = optim.trainable_mask(model, include=fill(include), exclude=fill(exclude))
    # The latents are cut from the VAE's graph (``AnimateAnyone.encode``): a VAE in the trainable set
    # would get zero gradients and only drift by weight decay.
    vae = [p for p in _paths(model.vae) if mask.selects(f"vae.{p}")]
    if vae:
        raise ValueError(f"config.trainable selects VAE parameters (vae.{vae[0]}, ...): the VAE cannot train "
                         "here, its latents carry no gradient; leave it out of config.trainable.include")
    return mask


def trained_components(model: AnimateAnyone, mask: optim.TrainableFilter) -> tuple[str, ...]:
    """The components with at least one trainable parameter."""
    return tuple(name for name, module in model.components().items()
                 if any(mask.selects(f"{name}.{p}") for p in _paths(module)))


def _paths(module) -> list[str]:
    return [optim.path_str(p) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))]
