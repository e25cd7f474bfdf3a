"""CLIPVisionModelWithProjection vs transformers (fp32, CPU, every parameter randomised), key map,
and Moore's inference preprocessing vs transformers' CLIPImageProcessor."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

import jax.numpy as jnp
from anim_jax.convert.clip_keys import CLIP_KEYMAP
from anim_jax.convert.loader import load_torch_state_dict
from anim_jax.convert.mapping import CheckpointMismatchError, export_torch_state_dict, flat_params
from anim_jax.convert.model_configs import clip_config_from_transformers
from anim_jax.models.clip import CLIPVisionConfig, CLIPVisionModelWithProjection, clip_preprocess
from tolerance import Tol, assert_close

CONFIGS = {
    "quick_gelu": dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=30, patch_size=6, projection_dim=16, hidden_act="quick_gelu",
    ),
    "gelu": dict(
        hidden_size=48, intermediate_size=64, num_attention_heads=3, num_hidden_layers=3,
        image_size=28, patch_size=4, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-6,
    ),
}  # fmt: skip


def torch_clip(kw, seed=0):
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**kw)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif name.endswith("bias") or "embedding" in name and p.ndim < 4:
                p.copy_(0.2 * r)
            else:
                p.copy_(r / np.sqrt(p[0].numel()))
    return model


def state_dict_np(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def jax_clip(kw, seed=0) -> CLIPVisionModelWithProjection:
    """Built abstractly then filled from numpy: eager init compiles a kernel per parameter shape."""
    config = clip_config_from_transformers(kw)
    model = nnx.eval_shape(lambda: CLIPVisionModelWithProjection(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for var in flat_params(model).values():
        s = var.get_raw_value()
        var.set_raw_value(jnp.asarray((0.1 * rng.standard_normal(s.shape)).astype(s.dtype)))
    return model


# What our fp32 port reaches against the original on these configs, with a 10x margin (tolerance.py).
CLIP_TOL = Tol(rtol=2e-5, atol=2e-5)


encode = nnx.jit(CLIPVisionModelWithProjection.encode)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity(name):
    kw = CONFIGS[name]
    tm = torch_clip(kw)
    sd = state_dict_np(tm)
    # the buffer older transformers saved (e.g. sd-image-variations' image_encoder) is ignored
    sd["vision_model.embeddings.position_ids"] = np.arange((kw["image_size"] // kw["patch_size"]) ** 2 + 1)[None]
    model = load_torch_state_dict(jax_clip(kw), sd, CLIP_KEYMAP)

    s = kw["image_size"]
    x = np.random.default_rng(0).standard_normal((3, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    out = encode(model, jnp.asarray(x))
    assert out.image_embeds.shape == (3, kw["projection_dim"])
    assert_close(out.image_embeds, ref.image_embeds.numpy(), CLIP_TOL)
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), CLIP_TOL)
    np.testing.assert_allclose(model(jnp.asarray(x)), out.image_embeds, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"{s}x{s}"):
        model(jnp.zeros((1, s + 2, s, 3)))


def test_config_from_transformers():
    kw = CONFIGS["gelu"]
    cfg = clip_config_from_transformers(transformers.CLIPVisionConfig(**kw).to_dict())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, cfg.projection_dim) == (48, 3, 4, 24)
    assert cfg.hidden_act == "gelu" and cfg.layer_norm_eps == 1e-6 and cfg.num_positions == 50
    # a full CLIPConfig dict: its vision_config is used
    full = transformers.CLIPConfig(vision_config=kw).to_dict()
    assert clip_config_from_transformers(full) == cfg
    # sd-image-variations-diffusers/image_encoder/config.json (ViT-L/14) gives the defaults
    vit_l = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                 patch_size=14, projection_dim=768, hidden_act="quick_gelu", model_type="clip_vision_model",
                 dropout=0.0, initializer_factor=1.0)  # fmt: skip
    assert clip_config_from_transformers(vit_l) == CLIPVisionConfig()
    with pytest.raises(ValueError, match="hidden_act = 'relu'"):
        clip_config_from_transformers(dict(kw, hidden_act="relu"))


def test_preprocess_matches_clip_image_processor():
    """Moore: ``ref_image_pil.resize((224, 224))`` then ``CLIPImageProcessor()`` defaults.

    Both sides resize with the same PIL bicubic call, after which the processor's shortest-edge
    resize and centre crop are no-ops; what differs is only float32 rounding order in
    rescale/normalise, ~1 ulp of values up to ~2.2, so the tolerance is 1e-5 absolute.
    """
    Processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = Processor()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 157, 233, 3), dtype=np.uint8)
    squashed = [Image.fromarray(im).resize((224, 224), Image.Resampling.BICUBIC) for im in images]
    ref = np.asarray(processor(images=squashed, return_tensors="np")["pixel_values"]).transpose(0, 2, 3, 1)

    ours = clip_preprocess(images)
    assert ours.shape == (2, 224, 224, 3) and ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    assert err < 1e-5, err
    # PIL input, a list of PIL images and a single (H, W, 3) array take the same path
    np.testing.assert_array_equal(clip_preprocess([Image.fromarray(im) for im in images]), ours)
    np.testing.assert_array_equal(clip_preprocess(Image.fromarray(images[1]))[0], ours[1])
    np.testing.assert_array_equal(clip_preprocess(images[0]), ours[:1])
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(images.astype(np.float32))


def test_strict_loading_errors():
    kw = CONFIGS["quick_gelu"]
    sd = state_dict_np(torch_clip(kw))
    gone = "vision_model.encoder.layers.1.mlp.fc2.bias"
    del sd[gone]
    sd["vision_model.encoder.layers.2.mlp.fc2.bias"] = np.zeros(32, np.float32)
    sd["visual_projection.weight"] = np.zeros((32, 16), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_torch_state_dict(jax_clip(kw), sd, CLIP_KEYMAP)
    msg = str(e.value)
    assert gone in msg and "layers.2.mlp.fc2.bias" in msg
    assert "visual_projection.weight: checkpoint (32, 16), model expects (16, 32)" in msg


def test_export_round_trip():
    kw = CONFIGS["gelu"]
    # a real (eager) construction here, so the concrete initialisers run too
    model = CLIPVisionModelWithProjection(clip_config_from_transformers(kw), rngs=nnx.Rngs(3))
    exported = export_torch_state_dict(model, CLIP_KEYMAP)
    fresh = load_torch_state_dict(jax_clip(kw, seed=5), exported, CLIP_KEYMAP)
    fa, fb = flat_params(model), flat_params(fresh)
    for k in fa:
        np.testing.assert_array_equal(fa[k][...], fb[k][...])
    tm = torch_clip(kw)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True)
    x = np.random.default_rng(1).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).image_embeds
    assert_close(encode(model, jnp.asarray(x)).image_embeds, ref.numpy(), CLIP_TOL)


def test_sharded_parity(devices):
    """Parameters placed by their logical axes on a (fsdp=2, tensor=4) mesh: same embeddings as transformers."""
    from anim_jax.parallel import make_mesh, shard_model

    kw = CONFIGS["gelu"]
    tm = torch_clip(kw)
    model = load_torch_state_dict(jax_clip(kw), state_dict_np(tm), CLIP_KEYMAP)
    model = shard_model(model, make_mesh((2, 4), ("fsdp", "tensor")))
    assert len(model.vision_model.encoder.layers[0].mlp.fc1.kernel[...].sharding.device_set) == 8
    x = np.random.default_rng(2).standard_normal((2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm(pixel_values=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).image_embeds
    assert_close(encode(model, jnp.asarray(x)).image_embeds, ref.numpy(), CLIP_TOL)
