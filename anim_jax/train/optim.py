"""Optimizer, learning-rate schedule and the trainable-parameter mask.

Defaults are Moore-AnimateAnyone's (``configs/train/stage{1,2}.yaml``): AdamW with lr 1e-5,
betas (0.9, 0.999), eps 1e-8, weight decay 1e-2 on every parameter, global-norm clipping at 1.0,
no gradient accumulation. ``torch.optim.AdamW`` and ``optax.adamw`` are the same update (decoupled
decay scaled by the learning rate, eps added to ``sqrt(v_hat)``).

Schedule: ``lr * min(1, (step + 1) / warmup_steps)`` during warm-up, then constant or a cosine
decay to ``lr * min_lr_ratio`` at ``total_steps``. Counting from ``step + 1`` means the first update
already moves the weights, and ``warmup_steps=1`` (Moore's value) is exactly a constant schedule,
which is what Moore's ``get_scheduler("constant", num_warmup_steps=1)`` does (diffusers' "constant"
ignores the warm-up). Steps are optimizer updates: with ``grad_accum_steps=k`` the schedule advances
once every k micro-batches.

The learning rate is injected as a hyper-parameter (``optax.inject_hyperparams``), so the value
used by the latest update is readable from the optimizer state (``current_lr``) and checkpointed
with it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

# Moore-AnimateAnyone's optimizer settings (both stages).
DEFAULTS = dict(
    lr=1e-5,
    warmup_steps=1,
    schedule="constant",
    total_steps=30_000,
    min_lr_ratio=0.0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    grad_clip_norm=1.0,
    grad_accum_steps=1,
)


def default_config() -> ml_collections.ConfigDict:
    """The optimizer section of a training config, with Moore's values."""
    return ml_collections.ConfigDict(dict(DEFAULTS))


def _get(cfg, name):
    if cfg is None:
        return DEFAULTS[name]
    return cfg.get(name, DEFAULTS[name]) if hasattr(cfg, "get") else getattr(cfg, name, DEFAULTS[name])


def make_schedule(cfg) -> optax.Schedule:
    """Learning rate as a function of the optimizer-update count (see the module docstring)."""
    lr = float(_get(cfg, "lr"))
    warmup = int(_get(cfg, "warmup_steps"))
    kind = _get(cfg, "schedule")
    total = int(_get(cfg, "total_steps"))
    min_ratio = float(_get(cfg, "min_lr_ratio"))
    if kind not in ("constant", "cosine"):
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {kind!r}")
    if warmup < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup}")

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        factor = jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else jnp.ones_like(count)
        if kind == "cosine":
            decay_steps = max(total - warmup, 1)
            progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
            cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            factor = factor * (min_ratio + (1.0 - min_ratio) * cosine)
        return lr * factor

    return schedule


def make_optimizer(cfg=None) -> optax.GradientTransformation:
    """AdamW + global-norm clipping + warm-up schedule (+ ``optax.MultiSteps`` accumulation).

    ``cfg`` is an ``ml_collections.ConfigDict`` (or any mapping) with the fields of ``DEFAULTS``;
    missing fields take Moore's values. Clipping acts on the accumulated gradient, as
    accelerate's ``clip_grad_norm_`` does after accumulation.
    """
    accum = int(_get(cfg, "grad_accum_steps"))
    if accum < 1:
        raise ValueError(f"optimizer.grad_accum_steps must be >= 1, got {accum}")
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=make_schedule(cfg),
        b1=float(_get(cfg, "b1")),
        b2=float(_get(cfg, "b2")),
        eps=float(_get(cfg, "eps")),
        weight_decay=float(_get(cfg, "weight_decay")),
    )
    clip = _get(cfg, "grad_clip_norm")
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), adamw) if clip else adamw
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx


def current_lr(opt_state) -> jnp.ndarray:
    """The learning rate of the latest update (or of the first one, before any update)."""
    is_inject = lambda x: isinstance(x, tuple) and hasattr(x, "hyperparams")
    for node in jax.tree.leaves(opt_state, is_leaf=is_inject):
        if is_inject(node) and "learning_rate" in node.hyperparams:
            return node.hyperparams["learning_rate"]
    raise ValueError("the optimizer state has no injected learning_rate (use make_optimizer)")


# --------------------------------------------------------------------------------------------
# Trainable-parameter selection
# --------------------------------------------------------------------------------------------


def path_str(path: Sequence[Any]) -> str:
    """An NNX path as a dotted string: ``('reference_net', 'up_blocks', 3, 'conv', 'kernel')`` ->
    ``'reference_net.up_blocks.3.conv.kernel'``."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


class TrainableFilter:
    """NNX filter: an ``nnx.Param`` whose dotted path matches (``re.search``) any ``include``
    pattern and no ``exclude`` pattern. Usable wherever NNX takes a filter (``nnx.split``,
    ``nnx.state``); ``selects(path)`` answers for a path alone."""

    def __init__(self, include: Sequence[str] = (r".*",), exclude: Sequence[str] = ()):
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self._inc = [re.compile(p) for p in self.include]
        self._exc = [re.compile(p) for p in self.exclude]

    def selects(self, path) -> bool:
        s = path if isinstance(path, str) else path_str(path)
        return any(p.search(s) for p in self._inc) and not any(p.search(s) for p in self._exc)

    def __call__(self, path, value) -> bool:
        return isinstance(value, nnx.Param) and self.selects(path)

    def __repr__(self):
        return f"TrainableFilter(include={list(self.include)}, exclude={list(self.exclude)})"

    def __eq__(self, other):
        return isinstance(other, TrainableFilter) and (self.include, self.exclude) == (other.include, other.exclude)

    def __hash__(self):
        return hash((self.include, self.exclude))


def trainable_mask(
    model: nnx.Module | None = None,
    include: Sequence[str] = (r".*",),
    exclude: Sequence[str] = (),
    *,
    check: bool = True,
) -> TrainableFilter:
    """The filter selecting trainable parameters by their NNX path.

    Examples: stage 2 ``include=[r"motion_modules"]``; stage 1
    ``include=[r"^(denoiser|reference_net|pose_guider)\\."], exclude=[r"^reference_net\\.up_blocks\\.3\\."]``.
    With ``model`` given and ``check``, a pattern that selects nothing is an error (a typo would
    otherwise silently freeze or train the wrong modules). ``mask_tree`` gives the pytree of bools.
    """
    f = TrainableFilter(include, exclude)
    if model is not None and check:
        paths = [path_str(p) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        for pat, rx in zip(f.include, f._inc):
            if pat != r".*" and not any(rx.search(p) for p in paths):
                raise ValueError(f"trainable include pattern {pat!r} matches no parameter")
        for pat, rx in zip(f.exclude, f._exc):
            if not any(rx.search(p) for p in paths):
                raise ValueError(f"trainable exclude pattern {pat!r} matches no parameter")
        if not any(f.selects(p) for p in paths):
            raise ValueError(f"{f} selects no parameter: nothing would train")
    return f


def mask_tree(model: nnx.Module, filt: Callable) -> dict:
    """A pure nested dict of bools over ``model``'s parameters: True where ``filt`` selects."""
    state = nnx.state(model, nnx.Param)
    flat = [(p, filt(p, v)) for p, v in nnx.to_flat_state(state)]
    return nnx.State.from_flat_path(flat).to_pure_dict()
