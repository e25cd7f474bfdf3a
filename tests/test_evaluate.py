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
