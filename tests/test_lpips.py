"""LPIPS port: parity with a PyTorch reference, converter round trip and errors, video helper.

torchvision and the lpips package are not installed here, so the reference is written below from
their definitions: torchvision's ``features`` Sequentials (same layers, order and indices, so the
state-dict keys match the released files) and lpips v0.1's forward pass. Every parameter is random.
"""

import json
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from anim_jax.convert.mapping import CheckpointMismatchError
from anim_jax.metrics.lpips import convert_lpips, load_lpips, lpips_frames, lpips_video
import seeded
from tolerance import Tol, assert_close

torch.manual_seed(0)

SIZE = {"vgg": 32, "alex": 64}  # alex needs >= 31 pixels for a 1x1 relu5


# ------------------------------------------------------------------------------------------------
# PyTorch reference


def torch_features(net: str) -> nn.Sequential:
    if net == "vgg":
        layers, cin = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        return nn.Sequential(*layers)
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


def torch_classifier(net: str) -> nn.Sequential:
    """torchvision's classifier key layout. LPIPS ignores these tensors whatever their shape, so they
    are tiny here instead of the real 25088x4096 (VGG) / 9216x4096 (AlexNet) matrices."""
    if net == "vgg":
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(True), nn.Dropout(), nn.Linear(8, 8), nn.ReLU(True),
                             nn.Dropout(), nn.Linear(8, 10))
    return nn.Sequential(nn.Dropout(), nn.Linear(8, 8), nn.ReLU(True), nn.Dropout(), nn.Linear(8, 8),
                         nn.ReLU(True), nn.Linear(8, 10))


class TorchTrunk(nn.Module):  # the torchvision model's state-dict layout
    def __init__(self, net):
        super().__init__()
        self.features = torch_features(net)
        self.classifier = torch_classifier(net)


class NetLinLayer(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.model(x)


class TorchHeads(nn.Module):  # the lpips weights file's layout: lin<k>.model.1.weight
    def __init__(self, channels):
        super().__init__()
        for k, c in enumerate(channels):
            setattr(self, f"lin{k}", NetLinLayer(c))


SLICES = {"vgg": ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), "alex": ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))}
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


class TorchLPIPS(nn.Module):
    """lpips v0.1 (lpips=True, spatial=False) forward on the modules above."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.trunk = TorchTrunk(net)
        self.heads = TorchHeads(CHANNELS[net])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        with torch.no_grad():  # random everything, scaled so activations stay O(1) through 13 convs
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    fan_in = m.weight[0].numel()
                    if m.bias is None:  # a lin layer: lpips's are non-negative
                        m.weight.copy_(torch.rand_like(m.weight))
                    else:
                        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                        m.bias.normal_(0.0, 0.1)
                elif isinstance(m, nn.Linear):
                    m.weight.normal_()
                    m.bias.normal_()
        self.eval()

    def features(self, x):
        x = (x - self.shift) / self.scale
        outs = []
        for a, b in SLICES[self.net]:
            x = self.trunk.features[a:b](x)
            outs.append(x)
        return outs

    def forward(self, in0, in1, normalize=False):
        if normalize:
            in0, in1 = 2 * in0 - 1, 2 * in1 - 1
        total = 0
        for k, (f0, f1) in enumerate(zip(self.features(in0), self.features(in1))):
            n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
            n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
            total = total + getattr(self.heads, f"lin{k}")((n0 - n1) ** 2).mean([2, 3], keepdim=True)
        return total.reshape(-1)


def torch_ref(ref, a, b, normalize=False):
    """Reference distances of channels-last numpy batches."""
    to = lambda x: torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32))
    with torch.no_grad():
        return ref(to(a), to(b), normalize=normalize).numpy()


# What our fp32 LPIPS reaches against the PyTorch one, with a 10x margin (tolerance.py).
LPIPS_TOL = Tol(rtol=1e-4, atol=1e-4)
ORIGINAL = np.load(pathlib.Path(__file__).parent / "data" / "lpips.npz")
ORIGINAL_SEED = {"vgg": 5, "alex": 6}


@pytest.fixture(scope="module", params=["vgg", "alex"])
def converted(request, tmp_path_factory):
    """(net, torch reference, files dir, converted dir)."""
    net = request.param
    ref = TorchLPIPS(net)
    files = tmp_path_factory.mktemp(f"lpips_{net}_src")
    torch.save(ref.trunk.state_dict(), files / "trunk.pth")
    torch.save(ref.heads.state_dict(), files / "lin.pth")
    out = convert_lpips(files / "trunk.pth", files / "lin.pth", files / "converted", net=net)
    return net, ref, files, out


def images(n, size, seed, lo=-1.0, hi=1.0):
    return np.random.default_rng(seed).uniform(lo, hi, (n, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Tests


def test_state_dict_keys_are_torchvision_and_lpips(converted):
    net, ref, _, _ = converted
    keys = set(ref.trunk.state_dict())
    convs = {"vgg": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), "alex": (0, 3, 6, 8, 10)}[net]
    heads = {"vgg": (0, 3, 6), "alex": (1, 4, 6)}[net]
    assert keys == {f"features.{i}.{p}" for i in convs for p in ("weight", "bias")} | {
        f"classifier.{i}.{p}" for i in heads for p in ("weight", "bias")
    }
    assert set(ref.heads.state_dict()) == {f"lin{k}.model.1.weight" for k in range(5)}


def test_parity_with_torch(converted):
    net, ref, _, out = converted
    model = load_lpips(out)
    assert model.net == net
    a, b = images(2, SIZE[net], 1), images(2, SIZE[net], 2)
    # every compared feature map
    x_t = torch.from_numpy(np.transpose(a, (0, 3, 1, 2)).copy())
    with torch.no_grad():
        ref_feats = [f.numpy().transpose(0, 2, 3, 1) for f in ref.features(x_t)]
    ours_feats = model.features(a)
    assert len(ours_feats) == 5
    for o, r in zip(ours_feats, ref_feats):
        assert_close(o, r, LPIPS_TOL)
    # the distance, on [-1, 1] inputs and with normalize=True on [0, 1] inputs
    assert_close(model(a, b), torch_ref(ref, a, b), LPIPS_TOL)
    u, v = (a + 1) / 2, (b + 1) / 2
    assert_close(model(u, v, normalize=True), torch_ref(ref, u, v, normalize=True), LPIPS_TOL)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_matches_original_lpips(net, tmp_path):
    """lpips.LPIPS(net=net, pnet_rand=True, pretrained=False) of the original repository with every
    trunk and linear-head weight drawn by tests/seeded.py; its features, distances on [-1, 1] and
    with normalize=True, and per-frame video distances (plain and DisCo's unnormalised [0, 1])."""
    seed, s = ORIGINAL_SEED[net], SIZE[net]
    trunk, heads = TorchTrunk(net), TorchHeads(CHANNELS[net])
    draw = lambda module, keep: {k: torch.from_numpy(seeded.value(seed, k, tuple(v.shape))) if k.startswith(keep) else v
                                 for k, v in module.state_dict().items()}  # noqa: E731
    torch.save(draw(trunk, "features."), tmp_path / "trunk.pth")  # classifier: ignored by LPIPS
    torch.save(draw(heads, "lin"), tmp_path / "lin.pth")
    model = load_lpips(convert_lpips(tmp_path / "trunk.pth", tmp_path / "lin.pth", tmp_path / "out", net=net))

    rng = np.random.default_rng(seed)  # the generator's draws, in its order
    a, b = (rng.uniform(-1, 1, (2, s, s, 3)).astype(np.float32) for _ in range(2))
    video = rng.integers(0, 256, (2, 3, s, s, 3), dtype=np.uint8)
    for i, f in enumerate(model.features(a[:1])):
        if f"{net}_features{i}" in ORIGINAL:
            assert_close(f, ORIGINAL[f"{net}_features{i}"], LPIPS_TOL, f"features {i}")
    assert_close(model(a, b), ORIGINAL[f"{net}_dist"], LPIPS_TOL, "distance")
    assert_close(model((a + 1) / 2, (b + 1) / 2, normalize=True), ORIGINAL[f"{net}_dist_normalize"], LPIPS_TOL,
                 "distance, normalize=True")
    assert_close(lpips_frames(model, video[0], video[1], batch_size=2), ORIGINAL[f"{net}_video_dist"], LPIPS_TOL,
                 "video frames")
    assert_close(lpips_frames(model, video[0].astype(np.float32) / 255, video[1].astype(np.float32) / 255,
                              batch_size=2, disco_compatible=True), ORIGINAL[f"{net}_video_dist_disco"], LPIPS_TOL,
                 "video frames, DisCo")


def test_converted_directory(converted):
    net, _, _, out = converted
    config = json.loads((out / "anim_jax.json").read_text())
    assert config["lpips"] == {"net": net, "version": "0.1"}
    assert sorted(p.name for p in out.iterdir()) == ["anim_jax.json", "lpips.safetensors"]


def test_video_matches_per_frame_reference(converted):
    net, ref, _, out = converted
    model = load_lpips(out)
    rng = np.random.default_rng(3)
    shape = (3, SIZE[net], SIZE[net], 3)
    pred, true = rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)
    u, v = pred.astype(np.float32) / 255, true.astype(np.float32) / 255
    # 3 frames in chunks of 2: the last chunk is padded
    frames = lpips_frames(model, pred, true, batch_size=2)
    assert_close(frames, torch_ref(ref, u, v, normalize=True), LPIPS_TOL)
    assert lpips_video(model, pred, true, batch_size=2) == pytest.approx(float(np.mean(frames)), rel=1e-6)
    # DisCo's protocol, on float frames: [0, 1] pixels fed to the [-1, 1] network unchanged
    assert_close(lpips_frames(model, u, v, batch_size=2, disco_compatible=True), torch_ref(ref, u, v), LPIPS_TOL)


def test_identical_images_give_zero(converted):
    net, _, _, out = converted
    model = load_lpips(out)
    a = images(2, SIZE[net], 4)
    assert np.all(np.asarray(model(a, a)) == 0.0)
    video = np.random.default_rng(5).integers(0, 256, (3, SIZE[net], SIZE[net], 3), dtype=np.uint8)
    assert lpips_video(model, video, video) == 0.0


def test_distance_grows_with_noise(converted):
    net, _, _, out = converted
    model = load_lpips(out)
    rng = np.random.default_rng(6)
    clean = rng.uniform(0.2, 0.8, (4, SIZE[net], SIZE[net], 3)).astype(np.float32)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    dists = [lpips_video(model, np.clip(clean + s * noise, 0, 1), clean) for s in (0.01, 0.05, 0.2)]
    assert 0 < dists[0] < dists[1] < dists[2], dists


def test_bad_trunk_keys_name_the_file(converted, tmp_path):
    net, ref, files, _ = converted
    sd = dict(ref.trunk.state_dict())
    del sd["features.0.bias"]
    sd["features.99.weight"] = torch.zeros(3)
    sd["features.2.weight" if net == "vgg" else "features.3.weight"] = torch.zeros(1, 2, 3, 3)
    torch.save(sd, tmp_path / "bad_trunk.pth")
    out = tmp_path / "out"
    with pytest.raises(CheckpointMismatchError) as e:
        convert_lpips(tmp_path / "bad_trunk.pth", files / "lin.pth", out, net=net)
    msg = str(e.value)
    assert "bad_trunk.pth" in msg and "trunk" in msg
    assert "features.0.bias" in msg and "features.99.weight" in msg and "misshaped" in msg
    assert not out.exists()


def test_linear_file_of_the_other_net_is_refused(converted, tmp_path):
    net, _, files, _ = converted
    other = TorchHeads(CHANNELS["alex" if net == "vgg" else "vgg"])
    torch.save(other.state_dict(), tmp_path / "other_lin.pth")
    with pytest.raises(CheckpointMismatchError, match=r"other_lin\.pth[\s\S]*misshaped"):
        convert_lpips(files / "trunk.pth", tmp_path / "other_lin.pth", tmp_path / "out", net=net)


def test_output_directory_rules(converted, tmp_path):
    net, _, files, _ = converted
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_lpips(files / "trunk.pth", files / "lin.pth", out, net=net)
    convert_lpips(files / "trunk.pth", files / "lin.pth", out, net=net, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["anim_jax.json", "lpips.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temp dirs


def test_load_rejects_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="anim_jax.json"):
        load_lpips(tmp_path)
    (tmp_path / "anim_jax.json").write_text(json.dumps({"format_version": 1, "vae": {}}))
    with pytest.raises(ValueError, match="not an LPIPS conversion"):
        load_lpips(tmp_path)


def test_bad_inputs():
    with pytest.raises(ValueError, match="net"):
        convert_lpips("a", "b", "c", net="squeeze")


def test_video_input_checks(converted):
    net, _, _, out = converted
    model = load_lpips(out)
    s = SIZE[net]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lpips_video(model, np.full((1, s, s, 3), 2.0, np.float32), np.zeros((1, s, s, 3), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        lpips_video(model, np.zeros((2, s, s, 3), np.uint8), np.zeros((1, s, s, 3), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        model(np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 3), np.float32))
