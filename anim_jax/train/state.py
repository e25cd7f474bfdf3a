"""A functional train state for NNX models, its sharded creation, and the generic train step.

Layout (a ``flax.struct`` pytree; every leaf is a ``jax.Array``)::

    TrainState
      step       int32[]        number of train_step calls done (micro-batches with accumulation)
      params     {path: array}  trainable parameters: float32 master copy (pure nested dict)
      frozen     {path: array}  every other model variable; floating ``nnx.Param``s optionally
                                cast to ``frozen_dtype`` (e.g. bf16) to halve their memory
      opt_state  optax state    over ``params`` only: frozen parameters have no optimizer state
      rng        uint32[2]      base key; the step's key is ``fold_in(rng, step)``
      graphdef   (static)       ``nnx.GraphDef``: ``nnx.merge(graphdef, params, frozen)`` is the model

``params`` and ``frozen`` are the pure dicts of ``nnx.split(model, mask, ...)``: checkpoints hold
plain nested dicts of arrays, independent of NNX's Variable classes. Placement follows the logical
axis names on the parameters and the rules table (``anim_jax.parallel``), i.e. FSDP over the
``fsdp`` axis with the default rules; optimizer-state leaves take the sharding of the parameter
they mirror (matched by tree path and shape), scalars (counts, hyper-parameters) are replicated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from anim_jax import parallel
from anim_jax.train.optim import current_lr

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    graphdef: Any = struct.field(pytree_node=False, default=None, repr=False)

    def model(self, dtype=None) -> nnx.Module:
        """The model (a fresh NNX module sharing these arrays), parameters optionally cast."""
        return nnx.merge(self.graphdef, cast_floating(self.params, dtype), cast_floating(self.frozen, dtype))

    def checkpoint_items(self, include_frozen: bool = True) -> dict:
        """The pytree Orbax stores (the graphdef is code, not data)."""
        items = dict(step=self.step, params=self.params, opt_state=self.opt_state, rng=self.rng)
        if include_frozen:
            items["frozen"] = self.frozen
        return items

    def replace_items(self, items: dict) -> "TrainState":
        return self.replace(**items)


def cast_floating(tree, dtype):
    """Casts the floating-point leaves of ``tree`` to ``dtype`` (``None``: unchanged)."""
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)

    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
            return x.astype(dtype)
        return x

    return jax.tree.map(one, tree)


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _cast_frozen(state: nnx.State, dtype) -> nnx.State:
    """Casts floating ``nnx.Param`` values (not RNG keys, counters or other variables)."""
    if dtype is None:
        return state

    def one(v):
        if isinstance(v, nnx.Param):
            return v.replace(cast_floating(v.get_value(), dtype))
        return v

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _place(x, sharding: NamedSharding):
    """``device_put`` that also works when ``sharding`` spans other processes' devices (every
    process must pass the same value, as with a seeded init or a loaded checkpoint file)."""
    if sharding.is_fully_addressable:
        return parallel.place(x, sharding)
    host = np.asarray(jax.device_get(x) if isinstance(x, jax.Array) else x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def follow_param_shardings(abstract_tree, params, params_shardings, mesh):
    """Shardings for a tree derived from ``params`` (optimizer state): a leaf whose tree path ends
    with a parameter's path and has that parameter's shape gets its sharding; anything else
    (step counts, hyper-parameters, ...) is replicated."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    table = {tuple(path): (tuple(x.shape), sh) for (path, x), sh in zip(flat, treedef.flatten_up_to(params_shardings))}
    rep = NamedSharding(mesh, P())

    def one(path, leaf):
        path = tuple(path)
        for i in range(len(path)):
            shape, sh = table.get(path[i:], (None, None))
            if shape == tuple(leaf.shape):
                return sh
        return rep

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def _layout(model: nnx.Module, mask, mesh, rules, frozen_dtype):
    graphdef, trainable, frozen = nnx.split(model, mask, ...)
    frozen = _cast_frozen(frozen, frozen_dtype)
    p_shard = _pure(parallel.state_shardings(trainable, mesh, rules))
    f_shard = _pure(parallel.state_shardings(frozen, mesh, rules))
    # The optimizer updates a float32 master copy whatever dtype the model was built in.
    params = cast_floating(_pure(trainable), jnp.float32)
    return graphdef, params, _pure(frozen), p_shard, f_shard


def _opt_shardings(optimizer, params, p_shard, mesh):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abs_opt = jax.eval_shape(optimizer.init, abstract)
    return abs_opt, follow_param_shardings(abs_opt, params, p_shard, mesh)


def _key_data(rng) -> np.ndarray:
    """Raw uint32 key data from an int seed, a typed key or raw key data."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.asarray(rng, np.uint32)


def create_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mask,
    mesh: jax.sharding.Mesh,
    rules=parallel.DEFAULT_RULES,
    frozen_dtype=None,
    *,
    rng=0,
) -> TrainState:
    """Splits ``model`` by ``mask`` (an NNX filter, e.g. ``optim.trainable_mask(...)``), places
    parameters on ``mesh`` by ``rules`` and initialises the optimizer state sharded like them.

    ``rng``: an int seed or a key; per-step keys are ``fold_in(rng, step)``.
    """
    graphdef, params, frozen, p_shard, f_shard = _layout(model, mask, mesh, rules, frozen_dtype)
    if not jax.tree.leaves(params):
        raise ValueError("the trainable mask selects no parameter")
    params = jax.tree.map(_place, params, p_shard)
    frozen = jax.tree.map(_place, frozen, f_shard)
    _, o_shard = _opt_shardings(optimizer, params, p_shard, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)
    rep = NamedSharding(mesh, P())
    return TrainState(
        step=_place(np.zeros((), np.int32), rep),
        params=params,
        frozen=frozen,
        opt_state=opt_state,
        rng=_place(_key_data(rng), rep),
        graphdef=graphdef,
    )


def abstract_train_state(
    model_fn: Callable[[], nnx.Module],
    optimizer: optax.GradientTransformation,
    mask,
    mesh: jax.sharding.Mesh,
    rules=parallel.DEFAULT_RULES,
    frozen_dtype=None,
) -> TrainState:
    """The ``TrainState`` of ``create_train_state(model_fn(), ...)`` as ``ShapeDtypeStruct``s with
    target shardings, without allocating anything: the restore target for big models."""
    model = nnx.eval_shape(model_fn)
    graphdef, params, frozen, p_shard, f_shard = _layout(model, mask, mesh, rules, frozen_dtype)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    params = jax.tree.map(sds, params, p_shard)
    frozen = jax.tree.map(sds, frozen, f_shard)
    abs_opt, o_shard = _opt_shardings(optimizer, params, p_shard, mesh)
    rep = NamedSharding(mesh, P())
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        params=params,
        frozen=frozen,
        opt_state=jax.tree.map(sds, abs_opt, o_shard),
        rng=jax.ShapeDtypeStruct(_key_data(0).shape, jnp.uint32, sharding=rep),
        graphdef=graphdef,
    )


def state_shardings(state: TrainState) -> TrainState:
    """The shardings of ``state`` (same pytree, ``Sharding`` leaves): jit in/out_shardings."""
    return jax.tree.map(lambda x: x.sharding, state)


def abstract_like(tree):
    """``ShapeDtypeStruct`` leaves carrying each array's sharding (a restore target); leaves that
    already are ``ShapeDtypeStruct``s are kept."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


def state_mesh(state: TrainState) -> jax.sharding.Mesh:
    return jax.tree.leaves(state_shardings(state))[0].mesh


# --------------------------------------------------------------------------------------------
# The generic train step
# --------------------------------------------------------------------------------------------


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    compute_dtype=None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """``train_step(state, batch) -> (state, metrics)`` around ``loss_fn(model, batch, rng) ->
    (loss, aux)``.

    ``model`` is ``nnx.merge(graphdef, params, frozen)`` with floating parameters cast to
    ``compute_dtype`` (``None`` keeps them as stored); gradients flow back through the cast to the
    float32 master ``params``. ``rng`` is ``fold_in(state.rng, state.step)``, so a resumed run draws
    the same noise. ``aux`` is a dict of scalar metrics merged into the returned metrics, which
    always hold ``loss``, ``grad_norm`` (global norm of this micro-batch's gradient, before clipping;
    ``grad_norm/<network>`` per top-level entry of ``params``) and ``lr`` (the learning rate of the latest optimizer update). Model-side choices (remat policy,
    attention implementation, activation dtype) belong to the model the ``graphdef`` describes.
    Jit it with ``jit_train_step``.
    """

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        frozen = cast_floating(state.frozen, compute_dtype)

        def compute(params):
            model = nnx.merge(state.graphdef, cast_floating(params, compute_dtype), frozen)
            loss, aux = loss_fn(model, batch, rng)
            return loss.astype(jnp.float32), aux

        (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(aux or {})
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads), lr=current_lr(opt_state))
        if isinstance(grads, dict):  # one norm per trained network too: which one a spike comes from
            metrics.update({f"grad_norm/{name}": optax.global_norm(g) for name, g in grads.items()})
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def jit_train_step(train_step, state: TrainState, batch_sharding, *, donate: bool = True,
                   compiler_options: dict[str, str] | None = None):
    """``jax.jit`` with explicit shardings: the state keeps its placement, ``batch_sharding`` (a
    ``Sharding`` or a pytree prefix of the batch) places the batch, metrics come back replicated;
    the input state is donated. ``compiler_options``: XLA options for its compilation."""
    shardings = state_shardings(state)
    rep = NamedSharding(state_mesh(state), P())
    return jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, rep),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options or None,
    )
