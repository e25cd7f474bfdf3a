"""The UNet with parameters sharded over 8 fake devices, jitted, matches the unsharded model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from anim_jax import parallel
from anim_jax.convert.mapping import flat_params
from test_unet_parity import TINY_2L, inputs, jax_unet, state_dict_numpy, torch_unet

# The shapes of test_reference_attention (shared eager compilations): videos over "data",
# parameters over "fsdp".
BATCH, FRAMES, HW = 2, 2, (8, 8)


def test_sharded_jit_matches_unsharded(devices):
    sd = state_dict_numpy(torch_unet(TINY_2L, seed=21))
    ref_sd = state_dict_numpy(torch_unet(TINY_2L, seed=22))
    x, t, ctx = inputs(TINY_2L, BATCH, FRAMES, HW)
    ref_x, _, _ = inputs(TINY_2L, BATCH, 1, HW, seed=3)
    args = (jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))

    ref_net = jax_unet(TINY_2L, ref_sd, reference_net=True)
    reference = ref_net(jnp.asarray(ref_x), jnp.zeros((BATCH,)), args[2])
    den = jax_unet(TINY_2L, sd)
    expected = np.asarray(den(*args, num_frames=FRAMES, reference=den.reference_kv(reference)))

    mesh = parallel.make_mesh((2, 4), ("data", "fsdp"))
    parallel.shard_model(den, mesh)
    specs = {path: var[...].sharding.spec for path, var in flat_params(den).items()}
    sharded = [p for p, spec in specs.items() if any(a is not None for a in spec)]
    assert len(sharded) > len(specs) // 3, f"only {len(sharded)} of {len(specs)} parameters are sharded"
    assert specs["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.kernel"] == P("fsdp", None)

    per_video = NamedSharding(mesh, P("data"))
    x_s = jax.device_put(args[0], parallel.batch_sharding(mesh, 4, batch_axes=("data",)))
    t_s, ctx_s = jax.device_put(args[1], per_video), jax.device_put(args[2], per_video)
    ref_s = {p: jax.device_put(r, per_video) for p, r in reference.items()}

    @jax.jit
    def step(model, x, t, ctx, reference):
        return model(x, t, ctx, num_frames=FRAMES, reference=model.reference_kv(reference))

    with jax.set_mesh(mesh):
        out = step(den, x_s, t_s, ctx_s, ref_s)
    assert out.sharding.spec[0] is not None  # the frame batch stays split over videos
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
