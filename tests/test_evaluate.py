"""Metrics: float per-frame PSNR/SSIM (not the uint8-overflow variant), L1, per-video and set means."""

import numpy as np
import pytest

from anim_jax import cli, media
from anim_jax.evaluate import mean_metrics, video_metrics


def _videos(seed=0, shape=(3, 16, 20, 3)):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 256, shape, dtype=np.uint8)
    pred = np.clip(true.astype(int) + rng.integers(-20, 21, shape), 0, 255).astype(np.uint8)
    return pred, true


def test_psnr_is_computed_in_float_not_with_uint8_overflow():
    pred, true = _videos()
    m = video_metrics(pred, true)
    mse = ((pred.astype(np.float64) - true) / 255.0) ** 2
    expected = np.mean([10 * np.log10(1.0 / f.mean()) for f in mse])
    assert m.psnr == pytest.approx(expected, rel=1e-9)
    # The DisCo-style bug: uint8 differences wrap around before squaring, inflating PSNR.
    wrapped = ((pred - true) ** 2).astype(np.float64) / 255.0**2
    buggy = np.mean([10 * np.log10(1.0 / f.mean()) for f in wrapped])
    assert abs(buggy - m.psnr) > 1.0
    assert m.l1 == pytest.approx(np.abs(pred.astype(float) - true).mean() / 255, rel=1e-9)
    assert m.frames == 3


def test_ssim_matches_scikit_image_per_frame_and_uint8_equals_float():
    from skimage.metrics import structural_similarity

    pred, true = _videos(1)
    per_frame = [structural_similarity(t / 255.0, p / 255.0, data_range=1.0, channel_axis=-1) for p, t in zip(pred, true)]
    assert video_metrics(pred, true).ssim == pytest.approx(np.mean(per_frame), rel=1e-9)
    assert video_metrics(pred / 255.0, true / 255.0).ssim == pytest.approx(video_metrics(pred, true).ssim, rel=1e-12)
    same = video_metrics(true, true)
    assert same.ssim == pytest.approx(1.0) and same.psnr == 100.0 and same.l1 == 0.0


def test_set_mean_weighs_videos_equally_and_bad_inputs_are_refused():
    a = video_metrics(*_videos(0, (2, 16, 16, 3)))
    b = video_metrics(*_videos(1, (6, 16, 16, 3)))
    assert mean_metrics([a, b])["psnr"] == pytest.approx((a.psnr + b.psnr) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        video_metrics(np.zeros((2, 16, 16, 3), np.uint8), np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        video_metrics(np.full((1, 16, 16, 3), 2.0), np.zeros((1, 16, 16, 3)))


def test_cli_evaluate_folders(tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    (tmp_path / "true").mkdir()
    for i in range(2):
        pred, true = _videos(i, (3, 32, 32, 3))
        media.write_gif(tmp_path / "pred" / f"v{i}.gif", pred)
        media.write_gif(tmp_path / "true" / f"v{i}.gif", true)
    assert cli.main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "true"), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "v0.gif" in out and "mean" in out and (tmp_path / "m.json").exists()
    assert cli.main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------ LPIPS and FVD through the CLI

# torchvision's AlexNet ``features`` convolutions (weight shapes) and lpips' linear-layer widths.
ALEX_CONVS = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
ALEX_TAPS = (64, 192, 384, 256, 256)


def _lpips_files(tmp_path, rng):
    import torch

    trunk = {}
    for i, shape in ALEX_CONVS.items():
        fan_in = int(np.prod(shape[1:]))
        trunk[f"features.{i}.weight"] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) / fan_in**0.5)
        trunk[f"features.{i}.bias"] = torch.from_numpy(rng.standard_normal(shape[0]).astype(np.float32) * 0.1)
    # lpips ships its v0.1 heads in torch's legacy (pre-1.6) format; write them that way too.
    lin = {f"lin{k}.model.1.weight": torch.from_numpy(rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32))
           for k, c in enumerate(ALEX_TAPS)}
    torch.save(trunk, tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "alex_lin.pth", _use_new_zipfile_serialization=False)
    return tmp_path / "alexnet.pth", tmp_path / "alex_lin.pth"


def _i3d_file(tmp_path, rng):
    from anim_jax.convert.readers import write_safetensors
    from anim_jax.metrics.fvd import expected_i3d_keys
    from anim_jax.metrics.i3d import I3DConfig

    tensors = {}
    for key, (_, shape) in expected_i3d_keys(I3DConfig().narrow(8)).items():
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 5:
            value = rng.standard_normal(shape) / np.prod(shape[1:]) ** 0.5
        else:
            value = rng.standard_normal(shape) * 0.1
        tensors[key] = value.astype(np.float32)
    write_safetensors(tmp_path / "i3d.safetensors", tensors)
    return tmp_path / "i3d.safetensors"


def test_cli_lpips_and_fvd_from_converted_weights(tmp_path, capsys):
    """convert-metric, then evaluate with both networks: the CLI's numbers are the library's on the
    same decoded videos, and FVD needs two videos per set."""
    import json

    from anim_jax.evaluate import _read_video
    from anim_jax.metrics.fvd import fvd, load_i3d
    from anim_jax.metrics.lpips import load_lpips, lpips_video

    rng = np.random.default_rng(0)
    trunk, lin = _lpips_files(tmp_path, rng)
    assert cli.main(["convert-metric", "lpips", "--net", "alex", "--trunk", str(trunk), "--linear", str(lin),
                     "--out", str(tmp_path / "lpips")]) == 0
    assert cli.main(["convert-metric", "i3d", "--weights", str(_i3d_file(tmp_path, rng)), "--out",
                     str(tmp_path / "i3d")]) == 0
    for d in ("pred", "true"):
        (tmp_path / d).mkdir()
    for i in range(2):
        pred, true = _videos(i, (9, 32, 32, 3))
        media.write_gif(tmp_path / "pred" / f"v{i}.gif", pred)
        media.write_gif(tmp_path / "true" / f"v{i}.gif", true)
    capsys.readouterr()
    args = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "true"), "--lpips-weights", str(tmp_path / "lpips"),
            "--fvd-weights", str(tmp_path / "i3d"), "--fvd-clips", "whole", "--json", str(tmp_path / "m.json")]
    assert cli.main(args) == 0
    assert "LPIPS" in capsys.readouterr().out
    record = json.loads((tmp_path / "m.json").read_text())

    lp, i3d = load_lpips(tmp_path / "lpips"), load_i3d(tmp_path / "i3d")
    preds = [_read_video(tmp_path / "pred" / f"v{i}.gif") for i in range(2)]
    trues = [_read_video(tmp_path / "true" / f"v{i}.gif") for i in range(2)]
    for i in range(2):
        expected = lpips_video(lp, preds[i], trues[i])
        assert expected > 0
        assert record["videos"][f"v{i}.gif"]["lpips"] == pytest.approx(expected, rel=1e-6)
    assert record["mean"]["fvd"] == pytest.approx(fvd(i3d, preds, trues, clips="whole"), rel=1e-6)
    assert record["mean"]["lpips"] == pytest.approx(np.mean([record["videos"][f"v{i}.gif"]["lpips"] for i in range(2)]))

    (tmp_path / "pred" / "v1.gif").unlink()
    (tmp_path / "true" / "v1.gif").unlink()
    assert cli.main(args) == 2
    assert "at least 2 videos" in capsys.readouterr().err
    assert cli.main(["convert-metric", "lpips", "--net", "vgg", "--trunk", str(trunk), "--linear", str(lin),
                     "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
