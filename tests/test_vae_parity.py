"""AutoencoderKL vs diffusers' AutoencoderKL (fp32, CPU, every parameter randomised), plus key maps."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx

import jax
import jax.numpy as jnp
from anim_jax.convert.mapping import CheckpointMismatchError, export_torch_state_dict, flat_params
from anim_jax.convert.model_configs import vae_config_from_diffusers
from anim_jax.convert.vae_keys import VAE_KEYMAP, load_vae_state_dict, rename_legacy_vae_keys
from anim_jax.models.vae import AutoencoderKL, VAEConfig
from tolerance import Tol, assert_close

CONFIGS = {
    # two levels, one resnet per encoder block, odd-ish 18x22 images
    "a": (dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4), (2, 18, 22)),
    # three levels (sizes divisible by 4), two resnets per block, 3 latent channels
    "b": (dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=4, latent_channels=3), (1, 20, 28)),
    # no mid-block attention, no quant convs; its logvar is pushed past both clip bounds
    "c": (
        dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            mid_block_add_attention=False,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        (1, 14, 10),
    ),
}


def torch_vae(kw, seed=0) -> TorchVAE:
    n = len(kw["block_out_channels"])
    model = TorchVAE(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **kw,
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.2 * r)
            elif p.ndim == 1:
                p.copy_(0.2 * r)
            else:
                p.copy_(r / np.sqrt(p[0].numel()))
    return model


def state_dict_np(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def random_model(build, seed=0):
    """``build()`` traced abstractly, then every parameter drawn from numpy.

    Eager NNX construction compiles one random-init kernel per distinct parameter shape (seconds
    for even a tiny VAE on CPU); the models here are overwritten by a checkpoint anyway.
    """
    model = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    for var in flat_params(model).values():
        s = var.get_raw_value()
        var.set_raw_value(jnp.asarray((0.1 * rng.standard_normal(s.shape)).astype(s.dtype)))
    return model


def jax_vae(tmodel, seed=1) -> AutoencoderKL:
    config = vae_config_from_diffusers(dict(tmodel.config))
    return random_model(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), seed)


# What our fp32 port reaches against the original on these configs, with a 10x margin (tolerance.py).
VAE_TOL = Tol(rtol=4e-5, atol=4e-5)


encode = nnx.jit(AutoencoderKL.encode)
decode = nnx.jit(AutoencoderKL.decode)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_decode_parity(name):
    kw, (b, h, w) = CONFIGS[name]
    tm = torch_vae(kw)
    if name == "c":  # latent channels 0-1 of logvar far above 20, 2-3 far below -30
        with torch.no_grad():
            tm.encoder.conv_out.bias[4:6] += 40.0
            tm.encoder.conv_out.bias[6:8] -= 60.0
    model = load_vae_state_dict(jax_vae(tm), state_dict_np(tm))

    x = np.random.default_rng(0).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        dist = tm.encode(nchw(x)).latent_dist
    mean, logvar = encode(model, jnp.asarray(x))
    assert_close(mean, nhwc(dist.mean), VAE_TOL)
    assert_close(logvar, nhwc(dist.logvar), VAE_TOL)
    if name == "c":
        assert float(logvar.max()) == 20.0 and float(logvar.min()) == -30.0

    s = model.config.downscale
    z = np.random.default_rng(1).standard_normal((b, h // s, w // s, kw["latent_channels"])).astype(np.float32)
    with torch.no_grad():
        ref = tm.decode(nchw(z)).sample
    out = decode(model, jnp.asarray(z))
    assert out.shape == (b, h, w, 3)
    assert_close(out, nhwc(ref), VAE_TOL)


def test_video_axes_and_sample():
    """Leading axes fold into the batch (per-frame statistics); ``sample`` is mean + std * eps."""
    kw, _ = CONFIGS["c"]
    tm = torch_vae(kw)
    model = load_vae_state_dict(jax_vae(tm), state_dict_np(tm))
    video = np.random.default_rng(3).uniform(-1, 1, (2, 3, 8, 12, 3)).astype(np.float32)
    mean, logvar = encode(model, jnp.asarray(video))
    assert mean.shape == (2, 3, 4, 6, 4)
    out = decode(model, mean)
    assert out.shape == video.shape
    with torch.no_grad():
        dist = tm.encode(nchw(video.reshape(6, 8, 12, 3))).latent_dist
        ref = tm.decode(dist.mean).sample
    assert_close(mean.reshape(6, 4, 6, 4), nhwc(dist.mean), VAE_TOL)
    assert_close(out.reshape(6, 8, 12, 3), nhwc(ref), VAE_TOL)

    key = jax.random.key(3)
    z = AutoencoderKL.sample(mean, logvar, key)
    expected = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-6)
    z_det = AutoencoderKL.sample(mean, jnp.full_like(logvar, -30.0), key)
    np.testing.assert_allclose(z_det, mean, atol=1e-5)


def test_legacy_attention_names():
    """Old .bin files name the mid-block attention query/key/value/proj_attn."""
    kw, _ = CONFIGS["a"]
    tm = torch_vae(kw)
    sd = state_dict_np(tm)
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert "decoder.mid_block.attentions.0.query.bias" in legacy
    assert rename_legacy_vae_keys(legacy).keys() == sd.keys()
    assert rename_legacy_vae_keys(sd).keys() == sd.keys()  # current names pass through

    a = load_vae_state_dict(jax_vae(tm, seed=1), sd)
    b = load_vae_state_dict(jax_vae(tm, seed=2), legacy)
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k][...], fb[k][...])

    current = "encoder.mid_block.attentions.0.to_q.weight"
    both = dict(legacy, **{current: sd[current]})
    with pytest.raises(ValueError, match="to_q.weight"):
        rename_legacy_vae_keys(both)


def test_config_from_diffusers():
    kw, _ = CONFIGS["b"]
    cfg = vae_config_from_diffusers(dict(torch_vae(kw).config))
    assert cfg.block_out_channels == (16, 32, 32) and cfg.layers_per_block == 2 and cfg.latent_channels == 3
    assert cfg.scaling_factor == 0.18215 and cfg.use_quant_conv and cfg.mid_block_add_attention
    assert cfg.downscale == 4
    sd_vae = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "sample_size": 256,
    }
    assert vae_config_from_diffusers(sd_vae) == VAEConfig()
    with pytest.raises(ValueError, match=r"down_block_types\[1\] = 'AttnDownEncoderBlock2D'"):
        vae_config_from_diffusers(dict(sd_vae, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"] * 2))
    with pytest.raises(ValueError, match="up_block_types"):
        vae_config_from_diffusers(dict(sd_vae, up_block_types=["UpDecoderBlock2D"] * 3))
    with pytest.raises(ValueError, match="act_fn"):
        vae_config_from_diffusers(dict(sd_vae, act_fn="gelu"))


def test_strict_loading_errors():
    kw, _ = CONFIGS["a"]
    tm = torch_vae(kw)
    sd = state_dict_np(tm)
    model = jax_vae(tm)
    gone = "decoder.up_blocks.1.resnets.1.conv2.weight"
    bad = dict(sd, **{"encoder.extra.weight": np.zeros(3, np.float32)})
    del bad[gone]
    bad["quant_conv.bias"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_vae_state_dict(model, bad)
    msg = str(e.value)
    assert gone in msg and "encoder.extra.weight" in msg
    assert "quant_conv.bias: checkpoint (5,), model expects (8,)" in msg


def test_export_round_trip():
    kw, (b, h, w) = CONFIGS["b"]
    tm = torch_vae(kw)
    model = jax_vae(tm, seed=7)
    exported = export_torch_state_dict(model, VAE_KEYMAP)
    fresh = load_vae_state_dict(jax_vae(tm, seed=8), exported)
    fa, fb = flat_params(model), flat_params(fresh)
    for k in fa:
        np.testing.assert_array_equal(fa[k][...], fb[k][...])
    # the exported keys are exactly diffusers' (strict load into the PyTorch model)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
    x = np.random.default_rng(2).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm.encode(nchw(x)).latent_dist.mean
    assert_close(encode(model, jnp.asarray(x))[0], nhwc(ref), VAE_TOL)


def test_sharded_parity(devices):
    """Parameters placed by their logical axes on a (fsdp=2, tensor=4) mesh: same latents as diffusers."""
    from anim_jax.parallel import make_mesh, shard_model

    kw, (b, h, w) = CONFIGS["a"]
    tm = torch_vae(kw)
    model = shard_model(load_vae_state_dict(jax_vae(tm), state_dict_np(tm)), make_mesh((2, 4), ("fsdp", "tensor")))
    assert len(model.encoder.down_blocks[1].resnets[0].conv1.kernel[...].sharding.device_set) == 8
    x = np.random.default_rng(4).uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm.encode(nchw(x)).latent_dist.mean
    assert_close(encode(model, jnp.asarray(x))[0], nhwc(ref), VAE_TOL)
