"""I3D / FVD: parity of the Flax I3D with piergiaj/pytorch-i3d's own InceptionI3d at full size (arrays
it produced, tests/data/README.md) and, for narrow widths and the pooling variants the original
cannot express, with a PyTorch I3D written here after its structure; the converter (strict keys, full-size key set), the feature extraction options, and the Fréchet
distance against closed forms and an eigendecomposition computed independently of scipy's sqrtm."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from anim_jax.convert import store
from anim_jax.convert.mapping import CheckpointMismatchError
from anim_jax.convert.readers import write_safetensors
from anim_jax.metrics.fvd import (
    convert_i3d,
    expected_i3d_keys,
    frechet_distance,
    fvd,
    i3d_features,
    load_i3d,
)
from anim_jax.metrics.i3d import MIXED_NAMES, I3DConfig
import seeded
from tolerance import Tol, assert_close

# ------------------------------------------------------------------------------------------------
# PyTorch reference: InceptionI3d's structure (Unit3D = conv without bias + BatchNorm3d + ReLU, TF
# "SAME" padding from the input size, zero-padded max pools, four-branch Inception modules, final
# (frames, 7, 7) average pool and a 1x1x1 biased logits conv, then the mean over time).


def _tf_same(sizes, kernel, stride):
    pads = []
    for s, k, st in zip(sizes, kernel, stride):
        total = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pads.append((total // 2, total - total // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    return (wf, wb, hf, hb, tf, tb)  # F.pad order: last axis first


class TorchUnit3D(nn.Module):
    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), head=False, eps=1e-3):
        super().__init__()
        self.kernel, self.stride, self.head = tuple(kernel), tuple(stride), head
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0, bias=head)
        if not head:
            self.bn = nn.BatchNorm3d(cout, eps=eps)

    def forward(self, x):
        x = self.conv3d(F.pad(x, _tf_same(x.shape[2:], self.kernel, self.stride)))
        return x if self.head else F.relu(self.bn(x))


class TorchMaxPoolSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return F.max_pool3d(F.pad(x, _tf_same(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride)


class TorchInception(nn.Module):
    def __init__(self, cin, w, eps):
        super().__init__()
        self.b0 = TorchUnit3D(cin, w[0], eps=eps)
        self.b1a = TorchUnit3D(cin, w[1], eps=eps)
        self.b1b = TorchUnit3D(w[1], w[2], (3, 3, 3), eps=eps)
        self.b2a = TorchUnit3D(cin, w[3], eps=eps)
        self.b2b = TorchUnit3D(w[3], w[4], (3, 3, 3), eps=eps)
        self.b3a = TorchMaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = TorchUnit3D(cin, w[5], eps=eps)

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class TorchI3D(nn.Module):
    def __init__(self, stem=(64, 64, 192), mixed=I3DConfig().mixed_channels, classes=400, eps=1e-3):
        super().__init__()
        layers = [
            ("Conv3d_1a_7x7", TorchUnit3D(3, stem[0], (7, 7, 7), (2, 2, 2), eps=eps)),
            ("MaxPool3d_2a_3x3", TorchMaxPoolSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", TorchUnit3D(stem[0], stem[1], eps=eps)),
            ("Conv3d_2c_3x3", TorchUnit3D(stem[1], stem[2], (3, 3, 3), eps=eps)),
            ("MaxPool3d_3a_3x3", TorchMaxPoolSame((1, 3, 3), (1, 2, 2))),
        ]
        cin = stem[2]
        for name, w in zip(MIXED_NAMES, mixed):
            layers.append((name, TorchInception(cin, w, eps)))
            cin = w[0] + w[2] + w[4] + w[5]
            if name == "Mixed_3c":
                layers.append(("MaxPool3d_4a_3x3", TorchMaxPoolSame((3, 3, 3), (2, 2, 2))))
            if name == "Mixed_4f":
                layers.append(("MaxPool3d_5a_2x2", TorchMaxPoolSame((2, 2, 2), (2, 2, 2))))
        self.order = [n for n, _ in layers]
        for name, layer in layers:
            self.add_module(name, layer)
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
        self.logits = TorchUnit3D(cin, classes, head=True)

    def trunk(self, x):
        for name in self.order:
            x = getattr(self, name)(x)
        return x

    def head(self, x, avg_pool):
        pooled = avg_pool(x)
        logits = self.logits(pooled)
        return logits.squeeze(4).squeeze(3).mean(2), pooled.squeeze(4).squeeze(3).mean(2)

    def forward(self, x):
        return self.head(self.trunk(x), self.avg_pool)


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv3d.weight"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("bn.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:  # conv / bn biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 1.5 + 0.5)
    model.eval()


# Narrow widths and 24 classes: the same structure at a fraction of the cost (scipy's sqrtm of a
# 400x400 product alone takes seconds).
SMALL = dataclasses.replace(I3DConfig().narrow(8), num_classes=24)


def _torch_small(seed=0):
    model = TorchI3D(SMALL.stem_channels, SMALL.mixed_channels, SMALL.num_classes)
    _randomise(model, seed)
    return model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A narrow random torch I3D, its checkpoint and the converted Flax model."""
    root = tmp_path_factory.mktemp("i3d")
    ref = _torch_small()
    pt = root / "i3d_small.pt"
    torch.save(ref.state_dict(), pt)
    convert_i3d(pt, root / "converted")
    return ref, pt, load_i3d(root / "converted")


# What our fp32 I3D reaches against the PyTorch one, with a 10x margin (tolerance.py).
I3D_TOL = Tol(rtol=7e-6, atol=7e-6)


# ------------------------------------------------------------------------------------------------
# Network parity


def test_parity_with_torch_reference(small, tmp_path):
    ref, pt, model = small
    assert model.config == SMALL
    # Odd, unequal sizes exercise the asymmetric SAME padding; 17 frames end as 3 steps, so the
    # 2-frame average pool leaves 2 logits vectors to average.
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 17, 197, 211)).astype(np.float32)
    with torch.no_grad():
        features = ref.trunk(torch.from_numpy(x))
        want_logits, want_pooled = ref.head(features, ref.avg_pool)
        # DisCo's variant pools one frame at a time: a different average over the 3 steps.
        want1, _ = ref.head(features, nn.AvgPool3d((1, 7, 7), stride=(1, 1, 1)))
    video = jnp.asarray(x.transpose(0, 2, 3, 4, 1))
    logits, pooled = jax.jit(lambda v: model(v, return_pooled=True))(video)
    assert want_logits.std() > 1e-3 * want_logits.abs().max()  # a non-degenerate output
    assert_close(logits, want_logits.numpy(), I3D_TOL, "logits")
    assert_close(pooled, want_pooled.numpy(), I3D_TOL, "pooled features")

    assert np.abs(want1.numpy() - want_logits.numpy()).max() > 1e-3 * np.abs(want_logits.numpy()).max()
    convert_i3d(pt, tmp_path / "disco", logits_pool_frames=1)
    model1 = load_i3d(tmp_path / "disco")
    assert_close(jax.jit(model1)(video), want1.numpy(), I3D_TOL, "logits, 1-frame pool")


def test_rejects_wrong_frame_sizes(small):
    _, _, model = small
    with pytest.raises(ValueError, match="193-224 pixels"):
        model(jnp.zeros((1, 16, 160, 160, 3)))
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(jnp.zeros((1, 8, 224, 224, 3)))


# ------------------------------------------------------------------------------------------------
# Conversion


def test_full_size_conversion_and_parity(tmp_path):
    """Against piergiaj/pytorch-i3d's own InceptionI3d (arrays it produced, tests/data/README.md):
    its state-dict layout, and its logits and extract_features on one real FVD clip (16 frames,
    224x224) with seeded weights and running statistics (tests/seeded.py, seed 3)."""
    data = np.load(pathlib.Path(__file__).parent / "data" / "i3d.npz")
    original = {k: tuple(v) for k, v in json.loads(str(data["state_dict_shapes"])).items()}
    assert any(k.endswith("num_batches_tracked") for k in original)  # the converter must skip these
    want = {k: s for k, s in original.items() if not k.endswith("num_batches_tracked")}
    assert {k: s for k, (_, s) in expected_i3d_keys().items()} == want
    assert "Mixed_3b.b1b.conv3d.weight" in want and "logits.conv3d.bias" in want
    state = {k: torch.from_numpy(v) for k, v in seeded.state_dict(3, want).items()}
    state.update({k: torch.tensor(0) for k in original if k.endswith("num_batches_tracked")})
    torch.save(state, tmp_path / "rgb_full.pt")

    config = convert_i3d(tmp_path / "rgb_full.pt", tmp_path / "out")
    assert config == I3DConfig() and config.features == 1024
    assert store.read_config(tmp_path / "out")["model"] == "I3D"
    model = load_i3d(tmp_path / "out")
    conv = model.Mixed_5c.b2b.conv3d.kernel[...]
    want_conv = state["Mixed_5c.b2b.conv3d.weight"].numpy().transpose(2, 3, 4, 1, 0)  # (O, I, T, H, W) -> (T, H, W, I, O)
    np.testing.assert_array_equal(np.asarray(conv), want_conv)
    bn = model.Conv3d_1a_7x7.bn
    np.testing.assert_array_equal(np.asarray(bn.running_var[...]), state["Conv3d_1a_7x7.bn.running_var"].numpy())
    np.testing.assert_array_equal(np.asarray(bn.scale[...]), state["Conv3d_1a_7x7.bn.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(model.logits.conv3d.bias[...]), state["logits.conv3d.bias"].numpy())

    x = np.random.default_rng(4).uniform(-1, 1, (1, 3, 16, 224, 224)).astype(np.float32)
    logits, pooled = jax.jit(lambda v: model(v, return_pooled=True))(jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    assert logits.shape == (1, 400) and pooled.shape == (1, 1024)
    # The original returns (B, classes, T') logits and (B, 1024, T', 1, 1) features; FVD averages over T'.
    want_logits, want_pooled = data["logits"].mean(2), data["features"].reshape(1, 1024, -1).mean(2)
    assert want_logits.std() > 1e-2 * np.abs(want_logits).max()  # a non-degenerate output
    assert_close(logits, want_logits, I3D_TOL, "full-size logits")
    assert_close(pooled, want_pooled, I3D_TOL, "full-size pooled features")


def test_convert_accepts_safetensors(small, tmp_path):
    ref, _, model = small
    write_safetensors(tmp_path / "i3d.safetensors", {k: v.numpy() for k, v in ref.state_dict().items()})
    assert convert_i3d(tmp_path / "i3d.safetensors", tmp_path / "out") == SMALL
    again = load_i3d(tmp_path / "out")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_convert_rejects_bad_keys(small, tmp_path):
    ref, _, _ = small
    state = dict(ref.state_dict())
    state["Mixed_4b.b0.conv3d.weights"] = state.pop("Mixed_4b.b0.conv3d.weight")
    del state["Conv3d_2b_1x1.bn.running_mean"]
    state["logits.conv3d.bias"] = torch.zeros(7)
    bad = tmp_path / "bad_i3d.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointMismatchError) as err:
        convert_i3d(bad, tmp_path / "out")
    msg = str(err.value)
    for needle in ("bad_i3d.pt", "Mixed_4b.b0.conv3d.weight", "Mixed_4b.b0.conv3d.weights",
                   "Conv3d_2b_1x1.bn.running_mean", "logits.conv3d.bias"):
        assert needle in msg, needle
    assert not (tmp_path / "out" / store.CONFIG_NAME).exists()


def test_load_rejects_non_i3d_directories(small, tmp_path):
    _, pt, _ = small
    with pytest.raises(FileNotFoundError, match="not a converted-weights directory"):
        load_i3d(tmp_path)
    other = tmp_path / "other"
    store.write_config(other, {"model": "LPIPS"})
    with pytest.raises(ValueError, match="not I3D"):
        load_i3d(other)
    with pytest.raises(ValueError, match="own directory"):
        convert_i3d(pt, other)


# ------------------------------------------------------------------------------------------------
# Features and FVD


def _direct(model, video_u8):
    """The network on one clip, resized and rescaled here with the documented recipe."""
    def run(v):
        x = v.astype(jnp.float32)[None] / 255.0
        x = jax.image.resize(x, (1, x.shape[1], 224, 224, 3), "bilinear", antialias=True)
        logits, pooled = model(x * 2 - 1, return_pooled=True)
        return logits[0], pooled[0]

    return jax.tree.map(np.asarray, jax.jit(run)(jnp.asarray(video_u8)))


def test_i3d_features_clip_modes(small):
    _, _, model = small
    rng = np.random.default_rng(2)
    videos = rng.integers(0, 256, (3, 34, 48, 40, 3), dtype=np.uint8)

    first = i3d_features(model, videos, batch_size=2)  # 3 clips: the last batch is padded
    assert first.shape == (3, SMALL.num_classes)
    assert_close(first[2], _direct(model, videos[2, :16])[0], I3D_TOL, "first clip")
    np.testing.assert_allclose(i3d_features(model, videos / 255.0, batch_size=2), first, rtol=1e-5, atol=1e-5)

    seg = i3d_features(model, videos, clips="segments", batch_size=2)  # 2 segments each, 2 frames dropped
    halves = i3d_features(model, list(videos[:, 16:32]), batch_size=2)
    np.testing.assert_allclose(seg, (first + halves) / 2, rtol=1e-5, atol=1e-5)

    whole = i3d_features(model, [videos[0]], clips="whole", batch_size=1, return_pooled=True)
    assert whole.shape == (1, SMALL.features)
    assert_close(whole[0], _direct(model, videos[0])[1], I3D_TOL, "whole video, pooled features")

    with pytest.raises(ValueError, match="at least 16"):
        i3d_features(model, videos[:, :10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        i3d_features(model, videos.astype(np.float32))
    with pytest.raises(ValueError, match="clips="):
        i3d_features(model, videos, clips="all")


def test_fvd_uses_features_and_frechet(small):
    _, _, model = small
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 16, 48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    fa, fb = i3d_features(model, a, batch_size=2), i3d_features(model, b, batch_size=2)
    tr = np.trace(np.cov(fa, rowvar=False))
    got = fvd(model, a, b, batch_size=2)
    assert got == pytest.approx(frechet_distance(fb, fa), rel=1e-6) and got > 1e-2 * tr
    # 2 samples in 24-d: rank-1 covariances, whose product's square root sqrtm gets only to about
    # sqrt(machine eps) per null direction, so "zero" is small relative to the trace, not exact.
    assert abs(fvd(model, a, a, batch_size=2)) <= 1e-4 * tr


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def _trace_sqrt_product_eigh(s1, s2):
    """tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) from symmetric eigendecompositions (no sqrtm)."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ s2 @ root
    return np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()


def _independent(a, b, ddof=1):
    s1, s2 = np.cov(a, rowvar=False, ddof=ddof), np.cov(b, rowvar=False, ddof=ddof)
    d = a.mean(0) - b.mean(0)
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product_eigh(s1, s2)


def test_frechet_closed_forms():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    tr = np.trace(np.cov(a, rowvar=False))
    assert abs(frechet_distance(a, a)) <= 1e-8 * tr
    shift = rng.normal(size=6)
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-8, abs=1e-8 * tr)
    # b = c a + d: S_b = c^2 S_a, sqrt(S_a S_b) = c S_a.
    c = 1.7
    expect = np.sum(((1 - c) * a.mean(0) - shift) ** 2) + (1 - c) ** 2 * tr
    assert frechet_distance(a, c * a + shift) == pytest.approx(expect, rel=1e-8)


def test_frechet_matches_eigh_computation():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(250, 8)) @ rng.normal(size=(8, 8)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(_independent(a, b), rel=1e-7)
    assert frechet_distance(a, b, ddof=0) == pytest.approx(_independent(a, b, ddof=0), rel=1e-7)
    # Fewer samples than dimensions: singular covariances, as with small FVD test sets.
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(7, 12)) + 0.3
    got = frechet_distance(a, b)
    assert np.isfinite(got) and got == pytest.approx(_independent(a, b), rel=1e-4)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(4), np.zeros((3, 4)))


def test_config_round_trip():
    cfg = dataclasses.replace(SMALL, bn_eps=1e-5, logits_pool_frames=1)
    assert I3DConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        I3DConfig.from_dict({**cfg.to_dict(), "width": 3})
