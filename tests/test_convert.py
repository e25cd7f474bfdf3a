"""``anim-jax convert`` / ``anim-jax export`` (anim_jax.convert.moore, .cli).

A tiny Moore-AnimateAnyone set is made here with torch.save from randomised torch models (every
parameter random): the denoiser is a diffusers UNetMotionModel whose 2-D keys go to
denoising_unet.pth and whose motion keys, renamed to AnimateDiff's original format by a table written
here from moore.md 3.3, go to motion_module.pth; a second diffusers UNet2DConditionModel without
conv_norm_out/conv_out is reference_unet.pth; the PoseGuider, a diffusers AutoencoderKL and a
transformers CLIPVisionModelWithProjection complete it. It is converted through the CLI entry point
and every converted component reproduces its torch model. AnimateDiff v1/v2 checkpoints and a
diffusers MotionAdapter folder convert too; full-size SD1.5 + motion-v2 key sets are checked on
sparse files (shapes only: a dry run); bad checkpoints give errors naming file and key; export
writes Moore's four files, which torch loads bit-exact, and converts back identically.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import pathlib
import re
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from flax import nnx

from anim_jax import cli
from anim_jax.convert import layout, moore, store
from anim_jax.convert.components import load_components
from anim_jax.convert.layout import from_torch, to_torch
from anim_jax.convert.readers import read_checkpoint, read_safetensors
from anim_jax.diffusion import NoiseSchedule, moore_inference_schedule
from anim_jax.models import factory
from test_motion_parity import _PerFrameGroupNorm
from test_clip_parity import CLIP_TOL
from test_pose_guider_parity import POSE_GUIDER_TOL, TorchPoseGuider
from test_vae_parity import VAE_TOL
from tolerance import assert_close
from test_unet_parity import UNET_TOL, capture_attn1_inputs, inputs, nchw, nhwc, randomize_

# Tiny, Moore-shaped: CrossAttn + Down levels, 2 layers per block, the motion modules' defaults
# (8 heads, 32 groups, max_len 32) so nothing needs a flag. 32 groups on 32/64 channels.
UNET = dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2, attention_head_dim=2,
            cross_attention_dim=16, norm_num_groups=32)  # fmt: skip
POSE_CHANNELS = (4, 8, 12, 16)  # -> 32 = UNet block_out_channels[0]
VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4)
CLIP = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=30,
            patch_size=6, projection_dim=16, hidden_act="quick_gelu")  # fmt: skip
SD15_UNET_CONFIG = {  # Stable Diffusion 1.5's unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}  # fmt: skip
HEAD_KEYS = ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias")


# ------------------------------------------------------------------------------------------------
# Making checkpoints


def to_original_key(key: str) -> str:
    """diffusers MotionAdapter / UNetMotionModel motion key -> AnimateDiff original key (moore.md 3.3)."""
    prefix, rest = re.match(r"^(.*?motion_modules\.\d+)\.(.*)$", key).groups()
    rest = re.sub(r"^(transformer_blocks\.\d+)\.attn([12])\.", lambda m: f"{m[1]}.attention_blocks.{int(m[2]) - 1}.", rest)
    rest = re.sub(r"^(transformer_blocks\.\d+)\.norm([12])\.", lambda m: f"{m[1]}.norms.{int(m[2]) - 1}.", rest)
    rest = re.sub(r"^(transformer_blocks\.\d+)\.norm3\.", r"\1.ff_norm.", rest)
    return f"{prefix}.temporal_transformer.{rest}"


def original_motion_state_dict(diffusers_sd) -> collections.OrderedDict:
    """Original-format motion state dict; each block's ``pos_embed.pe`` becomes one ``pos_encoder.pe``
    per attention block, as the original stores it."""
    out = collections.OrderedDict()
    for key, value in diffusers_sd.items():
        if "motion_modules." not in key:
            continue
        if key.endswith(".pos_embed.pe"):
            block = to_original_key(key[: -len(".pos_embed.pe")] + ".x")[: -len(".x")]
            for k in (0, 1):
                out[f"{block}.attention_blocks.{k}.pos_encoder.pe"] = value.clone()
        else:
            out[to_original_key(key)] = value.clone()
    return out


def sinusoid(length: int, channels: int) -> np.ndarray:
    """The original PositionalEncoding table, written out independently."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, channels, 2, dtype=np.float64) / channels)
    pe = np.zeros((length, channels))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
    return pe.astype(np.float32)


def tiny_adapter(seed, *, mid_block=True, max_len=32, heads=8) -> MotionAdapter:
    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=tuple(UNET["block_out_channels"]), motion_layers_per_block=2,
                            motion_num_attention_heads=heads, motion_norm_num_groups=32,
                            motion_max_seq_length=max_len, use_motion_mid_block=mid_block)  # fmt: skip
    return randomize_(adapter, seed)


class MooreSet:
    """Paths of a tiny Moore-AnimateAnyone set plus the torch models it came from."""


@pytest.fixture(scope="module")
def moore_set(tmp_path_factory) -> MooreSet:
    root = tmp_path_factory.mktemp("moore_set")
    s = MooreSet()
    s.root = root
    s.moore = root / "moore"
    s.moore.mkdir()
    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(**UNET)
    s.denoiser = randomize_(UNetMotionModel.from_unet2d(unet2d, tiny_adapter(1)), 2)
    s.reference = randomize_(UNet2DConditionModel(**UNET), 3)
    s.pose_guider = randomize_(TorchPoseGuider(UNET["block_out_channels"][0], POSE_CHANNELS), 4)
    n = len(VAE["block_out_channels"])
    s.vae = randomize_(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                     up_block_types=("UpDecoderBlock2D",) * n, **VAE), 5)  # fmt: skip
    torch.manual_seed(6)
    s.clip = randomize_(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP)), 6)

    sd = s.denoiser.state_dict()
    s.denoiser_2d = collections.OrderedDict((k, v.clone()) for k, v in sd.items() if "motion_modules." not in k)
    s.motion = original_motion_state_dict(sd)
    s.reference_sd = collections.OrderedDict((k, v.clone()) for k, v in s.reference.state_dict().items()
                                             if k not in HEAD_KEYS)
    torch.save(s.denoiser_2d, s.moore / "denoising_unet.pth")
    torch.save(s.motion, s.moore / "motion_module.pth")
    torch.save(s.reference_sd, s.moore / "reference_unet.pth")
    torch.save(s.pose_guider.state_dict(), s.moore / "pose_guider.pth")
    s.unet_folder = root / "sd" / "unet"  # config.json + the reference net's weights (a full 2-D UNet)
    s.reference.save_pretrained(s.unet_folder)
    s.vae_folder = root / "vae"
    s.vae.save_pretrained(s.vae_folder, safe_serialization=False)  # a torch zip .bin, like sd-vae-ft-mse
    s.clip_folder = root / "image_encoder"
    s.clip.save_pretrained(s.clip_folder)
    return s


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def moore_argv(s: MooreSet, out, *extra):
    return ("convert", "--moore", s.moore, "--sd-unet-config", s.unet_folder / "config.json", "--vae", s.vae_folder,
            "--image-encoder", s.clip_folder, "--out", out, "--no-progress", *extra)


@pytest.fixture(scope="module")
def converted(moore_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "weights"
    rc, stdout, stderr = run_cli(*moore_argv(moore_set, out))
    assert rc == 0, stderr
    return out, stdout, load_components(out)


# ------------------------------------------------------------------------------------------------
# The Moore set


def test_summary_and_config(moore_set, converted):
    out, stdout, comps = converted
    n_motion = len(moore_set.motion)
    n_pe = sum(k.endswith("pos_encoder.pe") for k in moore_set.motion)
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line and line.split()[0] in factory.COMPONENTS}
    expected_tensors = {
        "denoiser": len(moore_set.denoiser_2d) + n_motion - n_pe,
        "reference_net": len(moore_set.reference_sd),
        "pose_guider": 16,
        "vae": len(moore_set.vae.state_dict()),
        "image_encoder": len(moore_set.clip.state_dict()),
    }
    for name, n in expected_tensors.items():
        assert rows[name][1] == str(n), stdout
    assert rows["denoiser"][3] == str(len(moore_set.denoiser_2d) + n_motion)  # keys read, pe included
    assert n_pe == 22  # 11 modules x 2 attention blocks
    assert f"{n_pe} pos_encoder.pe buffers checked" in stdout

    config = store.read_config(out)
    motion = config["denoiser"]["motion"]
    assert (motion["num_attention_heads"], motion["norm_num_groups"], motion["temporal_position_encoding_max_len"],
            motion["use_mid_block"], motion["levels"]) == (8, 32, 32, True, [0, 1])  # fmt: skip
    assert config["reference_net"]["motion"] is None
    assert config["pose_guider"] == {"conditioning_embedding_channels": 32, "block_out_channels": list(POSE_CHANNELS)}
    assert NoiseSchedule.from_config(config["schedule"]) == moore_inference_schedule()
    assert config["native"] == {"width": 512, "height": 768, "steps": 25, "guidance_scale": 3.5, "context_frames": 24}
    assert config["conversion"]["sources"]["denoiser"] == [str(moore_set.moore / "denoising_unet.pth"),
                                                           str(moore_set.moore / "motion_module.pth")]
    assert sorted(p.name for p in out.iterdir()) == sorted([store.CONFIG_NAME] + [f"{c}.safetensors" for c in factory.COMPONENTS])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_denoiser_matches_torch(moore_set, converted):
    """The whole UNet3D (2-D layers + motion modules) against diffusers' UNetMotionModel, whose motion
    GroupNorms run per frame like the original's."""
    _, _, comps = converted
    frames, batch = 3, 1
    x, t, ctx = inputs(UNET, batch, frames, (8, 8), seed=7, context_len=1)
    model = moore_set.denoiser
    norms = [m.norm for m in model.modules() if type(m).__name__ == "AnimateDiffTransformer3D"]
    assert len(norms) == 11
    saved = [n.__class__ for n in norms]
    for n in norms:
        n.__class__ = _PerFrameGroupNorm
    try:
        sample = torch.from_numpy(np.ascontiguousarray(x.reshape(batch, frames, 8, 8, 4).transpose(0, 4, 1, 2, 3)))
        with torch.no_grad():
            ref = model(sample, torch.from_numpy(t), torch.from_numpy(np.repeat(ctx, frames, axis=0))).sample.numpy()
    finally:
        for n, cls in zip(norms, saved):
            n.__class__ = cls
    ref = ref.transpose(0, 2, 3, 4, 1).reshape(batch * frames, 8, 8, 4)
    out = nnx.jit(lambda m, x, t, c: m(x, t, c, num_frames=frames))(comps["denoiser"], jnp.asarray(x), jnp.asarray(t),
                                                                    jnp.asarray(ctx))
    assert_close(out, ref, UNET_TOL)


def test_reference_net_matches_torch(moore_set, converted):
    _, _, comps = converted
    x, t, ctx = inputs(UNET, 1, 1, (8, 8), seed=8, context_len=1)
    names, ref_feats = capture_attn1_inputs(moore_set.reference, x, np.zeros_like(t), ctx)
    feats = nnx.jit(lambda m, x, t, c: m(x, t, c))(comps["reference_net"], jnp.asarray(x), jnp.zeros(t.shape),
                                                   jnp.asarray(ctx))
    assert len(feats) == len(ref_feats) == 6
    for ours, ref in zip(feats.values(), ref_feats):
        assert_close(ours, ref, UNET_TOL)


def test_pose_guider_vae_clip_match_torch(moore_set, converted):
    _, _, comps = converted
    rng = np.random.default_rng(9)
    pose = rng.uniform(0, 1, (2, 24, 16, 3)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(moore_set.pose_guider(nchw(pose)))
    assert_close(nnx.jit(lambda m, x: m(x))(comps["pose_guider"], jnp.asarray(pose)), ref, POSE_GUIDER_TOL)

    image = rng.uniform(-1, 1, (1, 16, 12, 3)).astype(np.float32)
    with torch.no_grad():
        dist = moore_set.vae.encode(nchw(image)).latent_dist
        z = rng.standard_normal((1, 8, 6, 4)).astype(np.float32)
        decoded = moore_set.vae.decode(nchw(z)).sample
    mean, logvar = nnx.jit(lambda m, x: m.encode(x))(comps["vae"], jnp.asarray(image))
    assert_close(mean, nhwc(dist.mean), VAE_TOL)
    assert_close(logvar, nhwc(dist.logvar), VAE_TOL)
    assert_close(nnx.jit(lambda m, z: m.decode(z))(comps["vae"], jnp.asarray(z)), nhwc(decoded), VAE_TOL)

    pixels = rng.standard_normal((2, 30, 30, 3)).astype(np.float32)
    with torch.no_grad():
        embeds = moore_set.clip(pixel_values=nchw(pixels)).image_embeds.numpy()
    assert_close(nnx.jit(lambda m, x: m(x))(comps["image_encoder"], jnp.asarray(pixels)), embeds, CLIP_TOL)


# ------------------------------------------------------------------------------------------------
# AnimateDiff motion modules


def _converted_motion_params(out: pathlib.Path) -> dict[str, np.ndarray]:
    """The converted denoiser's motion parameters, in PyTorch layout under original keys."""
    from anim_jax.convert.mapping import torch_key
    from anim_jax.convert.unet_keys import DENOISER_KEYMAP

    stored = read_safetensors(out / "denoiser.safetensors")
    return {torch_key(p, DENOISER_KEYMAP.renames): to_torch(p, v) for p, v in stored.items()
            if ".motion_modules." in p}


@pytest.mark.parametrize("kind", ["v1-ckpt-state_dict", "v2-ckpt-fp16", "diffusers-adapter"])
def test_animatediff_motion_modules(moore_set, tmp_path, kind):
    """SD1.5-style 2-D UNet folder (its config.json is found there) + an AnimateDiff motion module."""
    v1 = kind.startswith("v1")
    heads = 4 if kind == "diffusers-adapter" else 8
    adapter = tiny_adapter(10, mid_block=not v1, max_len=24 if v1 else 32, heads=heads)
    sd = adapter.state_dict()
    original = original_motion_state_dict(sd)
    extra = []
    if kind == "v1-ckpt-state_dict":
        path = tmp_path / "mm_sd_v15.ckpt"  # as a DataParallel training run saves it
        torch.save({"state_dict": {f"module.{k}": v for k, v in original.items()}, "global_step": 1000}, path)
    elif kind == "v2-ckpt-fp16":
        path = tmp_path / "mm_sd_v15_v2.ckpt"
        torch.save(collections.OrderedDict((k, v.half()) for k, v in original.items()), path)
        extra = ["--dtype", "keep"]
    else:
        path = tmp_path / "adapter"
        adapter.save_pretrained(path)  # config.json (heads 4) + diffusion_pytorch_model.safetensors
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli("convert", "--denoiser", moore_set.unet_folder, "--motion-module", path,
                                 "--out", out, "--no-progress", *extra)
    assert rc == 0, stderr
    motion = store.read_config(out)["denoiser"]["motion"]
    assert motion["use_mid_block"] is (not v1)
    assert motion["temporal_position_encoding_max_len"] == (24 if v1 else 32)
    assert motion["num_attention_heads"] == heads
    got = _converted_motion_params(out)
    want = {k: v.numpy() for k, v in original.items() if not k.endswith("pos_encoder.pe")}
    assert set(got) == set(want)
    for k in want:
        if kind == "v2-ckpt-fp16":
            assert got[k].dtype == np.float16
            np.testing.assert_array_equal(got[k], want[k].astype(np.float16), err_msg=k)
        else:
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The 2-D part comes from the SD folder's weights (the reference torch UNet), output head included.
    stored = read_safetensors(out / "denoiser.safetensors")
    np.testing.assert_array_equal(stored["conv_out.kernel"],
                                  from_torch("conv_out.kernel", moore_set.reference.conv_out.weight.detach().numpy()))
    # Any of these loads as a denoiser.
    model = load_components(out, components=("denoiser",))["denoiser"]
    assert len(model.mid_block.motion_modules) == (0 if v1 else 1)


def test_motion_module_alone_is_refused(moore_set, tmp_path):
    rc, _, err = run_cli("convert", "--motion-module", moore_set.moore / "motion_module.pth", "--out", tmp_path / "o",
                         "--no-progress")
    assert rc == 2 and "--denoiser" in err


def test_legacy_vae_names_and_bfloat16(moore_set, tmp_path):
    """sd-vae-ft-mse's .bin names the mid-block attention query/key/value/proj_attn; --dtype bfloat16."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = collections.OrderedDict()
    for key, value in moore_set.vae.state_dict().items():
        for new, old in legacy.items():
            key = re.sub(rf"(mid_block\.attentions\.0)\.{re.escape(new)}\.", rf"\1.{old}.", key)
        sd[key] = value
    assert sum(".query." in k or ".proj_attn." in k for k in sd) == 8
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text((moore_set.vae_folder / "config.json").read_text())
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    rc, stdout, err = run_cli("convert", "--vae", folder, "--out", tmp_path / "out", "--dtype", "bfloat16",
                              "--no-progress")
    assert rc == 0 and "legacy attention names" in stdout, err
    got = read_safetensors(tmp_path / "out" / "vae.safetensors")
    ref = {k: v.numpy() for k, v in moore_set.vae.state_dict().items()}
    assert got["encoder.mid_block.attentions.0.to_q.kernel"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["encoder.mid_block.attentions.0.to_out.kernel"].astype(np.float32),
                                  ref["encoder.mid_block.attentions.0.to_out.0.weight"].T.astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))
    np.testing.assert_array_equal(got["decoder.conv_in.kernel"].astype(np.float32),
                                  from_torch("k.kernel", ref["decoder.conv_in.weight"]).astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Full-size key sets (shapes only)


def _sparse_safetensors(path: pathlib.Path, shapes: dict[str, tuple[int, ...]], values: dict[str, np.ndarray]):
    """A float16 safetensors file with these shapes whose data region is a hole (reads as zeros, takes
    no disk space), except ``values``, which are written."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        f.truncate(8 + len(hb) + offset)
        for key, value in values.items():
            f.seek(8 + len(hb) + header[key]["data_offsets"][0])
            f.write(np.ascontiguousarray(value, np.float16).tobytes())


def test_full_size_key_sets(tmp_path):
    """SD1.5 + AnimateDiff-v2 key names and shapes (from diffusers' models on the meta device) convert
    (a dry run: every check, nothing written) with moore.md 3.3's counts."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in SD15_UNET_CONFIG.items() if not k.startswith("_")})
        adapter = MotionAdapter(motion_layers_per_block=2, motion_num_attention_heads=8, motion_max_seq_length=32,
                                use_motion_mid_block=True)  # fmt: skip
    unet_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    motion = original_motion_state_dict(adapter.state_dict())
    motion_shapes = {k: tuple(v.shape) for k, v in motion.items()}
    pe = {k: sinusoid(32, s[2])[None] for k, s in motion_shapes.items() if k.endswith("pos_encoder.pe")}
    assert (len(unet_shapes), len(motion_shapes), len(pe)) == (686, 588, 42)

    folder = tmp_path / "moore"
    folder.mkdir()
    _sparse_safetensors(folder / "denoising_unet.pth", unet_shapes, {})
    _sparse_safetensors(folder / "reference_unet.pth", {k: s for k, s in unet_shapes.items() if k not in HEAD_KEYS}, {})
    _sparse_safetensors(folder / "motion_module.pth", motion_shapes, pe)
    torch.save(TorchPoseGuider(320, (16, 32, 96, 256)).state_dict(), folder / "pose_guider.pth")
    (tmp_path / "config.json").write_text(json.dumps(SD15_UNET_CONFIG))

    report = moore.convert(moore.moore_inputs(folder, unet_config=tmp_path / "config.json"), tmp_path / "out",
                           dry_run=True, progress=False)
    got = {c.name: c for c in report.components}
    assert got["denoiser"].checkpoint_keys == 1274
    assert got["denoiser"].tensors == 1274 - 42
    assert got["reference_net"].checkpoint_keys == got["reference_net"].tensors == 682
    assert got["pose_guider"].tensors == 16
    pose_params = sum(p.numel() for p in TorchPoseGuider(320, (16, 32, 96, 256)).parameters())
    assert got["pose_guider"].parameters == pose_params and round(pose_params / 1e6, 3) == 1.086  # moore.md 1.6
    spatial = sum(math.prod(s) for s in unet_shapes.values())
    motion_params = sum(math.prod(s) for k, s in motion_shapes.items() if k not in pe)
    assert got["denoiser"].parameters == spatial + motion_params
    assert round(motion_params / 1e6, 1) == 453.2 and round(spatial / 1e6, 2) == 859.52
    assert any("42 pos_encoder.pe buffers checked" in n for n in got["denoiser"].notes)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Bad checkpoints


class NotATensor:
    pass


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "object", "int"])
def test_bad_pose_guider(moore_set, tmp_path, problem):
    sd = collections.OrderedDict(moore_set.pose_guider.state_dict())
    if problem == "missing":
        del sd["blocks.3.bias"]
        expect = ["missing", "blocks.3.bias"]
    elif problem == "extra":
        sd["blocks.3.scale"] = torch.ones(3)
        expect = ["unexpected", "blocks.3.scale", "pose_guider.pth"]
    elif problem == "shape":
        sd["conv_out.bias"] = torch.zeros(31)
        expect = ["misshaped", "conv_out.bias", "(31,)", "(32,)", "pose_guider.pth"]
    elif problem == "object":
        sd["note"] = NotATensor()
        expect = ["pose_guider.pth", "refusing", "NotATensor"]
    else:
        sd["epoch"] = 3
        expect = ["pose_guider.pth", "'epoch'", "not a tensor"]
    path = tmp_path / "pose_guider.pth"
    torch.save(sd, path)
    out = tmp_path / "out"
    rc, _, err = run_cli("convert", "--pose-guider", path, "--out", out, "--no-progress")
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("anim-jax convert: error: "), err
    for e in expect:
        assert e in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_denoiser_names_file_and_key(moore_set, tmp_path):
    motion = collections.OrderedDict(moore_set.motion)
    gone = "up_blocks.1.motion_modules.2.temporal_transformer.proj_out.bias"
    del motion[gone]
    motion["mid_block.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.zeros(64, 32)
    torch.save(motion, tmp_path / "motion_module.pth")
    rc, _, err = run_cli("convert", "--denoiser", moore_set.moore / "denoising_unet.pth", "--motion-module",
                         tmp_path / "motion_module.pth", "--sd-unet-config", moore_set.unet_folder, "--out",
                         tmp_path / "out", "--no-progress")
    assert rc == 2
    assert f"missing keys (in none of the files): {gone}" in err, err
    assert "mid_block.motion_modules.0.temporal_transformer.proj_in.weight: checkpoint (64, 32) in" in err
    assert str(tmp_path / "motion_module.pth") in err


def test_bad_position_encoding(moore_set, tmp_path):
    motion = collections.OrderedDict(moore_set.motion)
    key = next(k for k in motion if k.endswith("pos_encoder.pe"))
    motion[key] = motion[key] + 0.01
    torch.save(motion, tmp_path / "motion_module.pth")
    rc, _, err = run_cli("convert", "--denoiser", moore_set.moore / "denoising_unet.pth", "--motion-module",
                         tmp_path / "motion_module.pth", "--sd-unet-config", moore_set.unet_folder, "--out",
                         tmp_path / "out", "--dry-run")
    assert rc == 2 and key in err and "motion_module.pth" in err, err


def test_missing_unet_config(moore_set, tmp_path):
    rc, _, err = run_cli("convert", "--moore", moore_set.moore, "--out", tmp_path / "out", "--dry-run")
    assert rc == 2 and "--sd-unet-config" in err


def test_interrupted_conversion_leaves_nothing_complete(moore_set, tmp_path, monkeypatch):
    out = tmp_path / "weights"
    seen = []
    real = moore._write_component

    def write_then_die(plan, path, dtype, progress):
        real(plan, path, dtype, progress)
        if plan.name == "pose_guider":  # the third component: three files are complete on disk
            hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
            assert not out.exists() and len(hidden) == 1
            seen.append(sorted(q.name for q in hidden[0].iterdir()))
            with pytest.raises(FileNotFoundError, match=store.CONFIG_NAME):  # what a killed run leaves: not loadable
                load_components(hidden[0])
            raise KeyboardInterrupt

    monkeypatch.setattr(moore, "_write_component", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        moore.convert(moore.moore_inputs(moore_set.moore, unet_config=moore_set.unet_folder), out, progress=False)
    assert seen == [["denoiser.safetensors", "pose_guider.safetensors", "reference_net.safetensors"]]
    assert list(tmp_path.iterdir()) == []  # the partial directory is removed


def test_existing_output_needs_overwrite(moore_set, tmp_path):
    out = tmp_path / "weights"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ("convert", "--pose-guider", moore_set.moore / "pose_guider.pth", "--out", out, "--no-progress")
    rc, _, err = run_cli(*argv)
    assert rc == 2 and "--overwrite" in err and (out / "keep.txt").exists()
    rc, _, err = run_cli(*argv, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [store.CONFIG_NAME, "pose_guider.safetensors"]


def test_duplicate_motion_keys(moore_set, tmp_path):
    """A stage-2 denoising_unet.pth that holds the motion modules too (the original loads it last,
    with strict=False): identical copies are fine, different ones need --prefer-denoiser-file."""
    full = collections.OrderedDict(moore_set.denoiser_2d)
    full.update(moore_set.motion)
    torch.save(full, tmp_path / "same.pth")
    key = "down_blocks.1.motion_modules.0.temporal_transformer.proj_out.weight"
    full[key] = full[key] + 1
    torch.save(full, tmp_path / "different.pth")
    base = ("convert", "--motion-module", moore_set.moore / "motion_module.pth", "--sd-unet-config",
            moore_set.unet_folder, "--no-progress")
    rc, stdout, err = run_cli(*base, "--denoiser", tmp_path / "same.pth", "--out", tmp_path / "a", "--dry-run")
    assert rc == 0 and "identical values" in stdout, err
    rc, _, err = run_cli(*base, "--denoiser", tmp_path / "different.pth", "--out", tmp_path / "b")
    assert rc == 2 and key in err and "different.pth" in err and "--prefer-denoiser-file" in err
    rc, _, err = run_cli(*base, "--denoiser", tmp_path / "different.pth", "--out", tmp_path / "c",
                         "--prefer-denoiser-file")
    assert rc == 0, err
    np.testing.assert_array_equal(_converted_motion_params(tmp_path / "c")[key], full[key].numpy())
    # The denoising file alone (motion modules inside) is a complete denoiser as well.
    rc, stdout, err = run_cli("convert", "--denoiser", tmp_path / "same.pth", "--sd-unet-config",
                              moore_set.unet_folder, "--out", tmp_path / "d", "--no-progress")
    assert rc == 0 and "motion modules found in the denoiser file" in stdout, err


# ------------------------------------------------------------------------------------------------
# Export


def test_export_round_trip(moore_set, converted, tmp_path):
    out, _, _ = converted
    rc, stdout, err = run_cli("export", "--weights", out, "--out", tmp_path / "moore", "--no-progress")
    assert rc == 0, err
    files = {p.name for p in (tmp_path / "moore").iterdir()}
    assert files == {"denoising_unet.pth", "reference_unet.pth", "pose_guider.pth", "motion_module.pth"}
    originals = {
        "denoising_unet.pth": moore_set.denoiser_2d,
        "reference_unet.pth": moore_set.reference_sd,
        "pose_guider.pth": moore_set.pose_guider.state_dict(),
        "motion_module.pth": moore_set.motion,
    }
    for name, original in originals.items():
        loaded = torch.load(tmp_path / "moore" / name, weights_only=True)
        assert isinstance(loaded, collections.OrderedDict) and set(loaded) == set(original), name
        for k, v in original.items():
            assert loaded[k].dtype == torch.float32 and loaded[k].shape == v.shape, k
            if k.endswith("pos_encoder.pe"):  # recomputed: the formula, which diffusers' buffer matches
                np.testing.assert_allclose(loaded[k].numpy()[0], sinusoid(v.shape[1], v.shape[2]), atol=2e-6)
                np.testing.assert_allclose(loaded[k].numpy(), v.numpy(), atol=2e-6)
            else:
                assert torch.equal(loaded[k], v), k
        # Our reader agrees with torch.
        ours = read_checkpoint(tmp_path / "moore" / name)
        assert all(np.array_equal(ours[k], loaded[k].numpy()) for k in loaded)
    # Moore's loading: the 2-D UNet loads denoising_unet.pth strictly, the reference net lacks the head.
    unet = UNet2DConditionModel(**UNET)
    unet.load_state_dict(torch.load(tmp_path / "moore" / "denoising_unet.pth", weights_only=True), strict=True)
    result = unet.load_state_dict(torch.load(tmp_path / "moore" / "reference_unet.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == sorted(HEAD_KEYS) and not result.unexpected_keys
    pg = TorchPoseGuider(32, POSE_CHANNELS)
    pg.load_state_dict(torch.load(tmp_path / "moore" / "pose_guider.pth", weights_only=True), strict=True)

    # And back: converting the export gives the same directory (bit-exact parameters, same configs).
    again = tmp_path / "again"
    rc, _, err = run_cli("convert", "--moore", tmp_path / "moore", "--sd-unet-config", moore_set.unet_folder,
                         "--out", again, "--no-progress")
    assert rc == 0, err
    for name in ("denoiser", "reference_net", "pose_guider"):
        a, b = read_safetensors(out / f"{name}.safetensors"), read_safetensors(again / f"{name}.safetensors")
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), name
        assert store.read_config(out)[name] == store.read_config(again)[name]


def test_export_refuses_to_overwrite_and_casts(converted, tmp_path):
    out, _, _ = converted
    rc, _, err = run_cli("export", "--weights", out, "--out", tmp_path, "--no-progress", "--dtype", "float16")
    assert rc == 0, err
    sd = torch.load(tmp_path / "pose_guider.pth", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values())
    rc, _, err = run_cli("export", "--weights", out, "--out", tmp_path, "--no-progress")
    assert rc == 2 and "--overwrite" in err
    rc, _, err = run_cli("export", "--weights", tmp_path / "nowhere", "--out", tmp_path / "x", "--no-progress")
    assert rc == 2 and store.CONFIG_NAME in err


# ------------------------------------------------------------------------------------------------
# Re-layout


@pytest.mark.parametrize("shape", [(5, 7, 3, 3), (37, 3, 1, 1), (1030, 17, 3, 3), (3, 5), (2100, 33), (1, 1), (4, 3, 2, 5, 7)])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layout_rule(shape, dtype):
    """PyTorch (out, in) <-> (in, out); (O, I, *spatial) <-> (*spatial, I, O), in a fresh C-contiguous copy."""
    rng = np.random.default_rng(0)
    value = rng.standard_normal(shape).astype(np.float32)
    axes = (1, 0) if len(shape) == 2 else (*range(2, len(shape)), 1, 0)
    ours = from_torch("a.kernel", value, dtype=dtype)
    assert ours.flags.c_contiguous and ours.dtype == dtype
    np.testing.assert_array_equal(ours, np.transpose(value, axes).astype(dtype))
    assert layout.nnx_shape("a.kernel", shape) == ours.shape and layout.torch_shape("a.kernel", ours.shape) == shape
    np.testing.assert_array_equal(to_torch("a.kernel", ours), value.astype(dtype))
    bias = from_torch("a.bias", value, dtype=dtype)
    np.testing.assert_array_equal(bias, value.astype(dtype))
    assert layout.nnx_shape("a.scale", shape) == shape
