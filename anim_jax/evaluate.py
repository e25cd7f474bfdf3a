"""Video quality metrics and ``anim-jax evaluate``.

PSNR and SSIM come from scikit-image and are computed per frame in float on the [0, 1] range
(``data_range=1``), then averaged per video and over a set. This avoids the DisCo-era bug where
uint8 differences overflowed before squaring (peers.md §3), which inflated the PSNR reported by
most animation papers; our numbers are comparable to the "PSNR*" columns, not to those.
L1 is the mean absolute error on [0, 1].

LPIPS (per frame, averaged like the others) and FVD (over the whole set of videos) run the Flax
ports in ``anim_jax.metrics`` on weights the user converts once with ``anim-jax convert-metric``
(the package ships no pretrained networks). ``--lpips-disco`` feeds LPIPS [0, 1] images as DisCo's
evaluation code did, for comparison with the published tables; ``--fvd-clips`` picks which frames
make each video's I3D vector (``anim_jax.metrics.fvd``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class VideoMetrics:
    psnr: float
    ssim: float
    l1: float
    frames: int
    lpips: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_unit_float(video: np.ndarray, name: str) -> np.ndarray:
    from anim_jax.media import checked_frames

    video = checked_frames(video, name)
    return video.astype(np.float64) / 255.0 if video.dtype == np.uint8 else video.astype(np.float64)


def video_metrics(prediction: np.ndarray, target: np.ndarray) -> VideoMetrics:
    """Per-frame PSNR / SSIM / L1 of (F, H, W, 3) videos, averaged over frames."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    pred = _as_unit_float(prediction, "prediction")
    true = _as_unit_float(target, "target")
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and target {true.shape} differ in shape")
    if min(pred.shape[1:3]) < 7:
        raise ValueError(f"frames of {pred.shape[1]}x{pred.shape[2]} are too small for SSIM's 7x7 window")
    psnr, ssim = [], []
    for p, t in zip(pred, true):
        mse = np.mean((p - t) ** 2)
        # identical frames have infinite PSNR; cap at 100 dB so averages stay finite.
        psnr.append(100.0 if mse == 0 else float(peak_signal_noise_ratio(t, p, data_range=1.0)))
        ssim.append(float(structural_similarity(t, p, data_range=1.0, channel_axis=-1)))
    return VideoMetrics(psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim)),
                        l1=float(np.mean(np.abs(pred - true))), frames=len(pred))


def mean_metrics(per_video: Sequence[VideoMetrics]) -> dict:
    """The average over videos (each video weighs the same, whatever its length)."""
    if not per_video:
        raise ValueError("no videos to average")
    keys = ["psnr", "ssim", "l1"] + (["lpips"] if all(m.lpips is not None for m in per_video) else [])
    return {k: float(np.mean([getattr(m, k) for m in per_video])) for k in keys} | {"videos": len(per_video)}


def _read_video(path: pathlib.Path) -> np.ndarray:
    from anim_jax import media

    if path.is_dir() or path.suffix.lower() in media.VIDEO_SUFFIXES:
        frames, _ = media.load_pose_frames(path)
    else:
        frames = [media.to_rgb_image(path, name="frame")]
    return np.stack([np.asarray(f) for f in frames])


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="PSNR / SSIM / L1 of generated videos against ground truth",
        description="Compare generated videos with ground-truth videos frame by frame (float, [0, 1]). "
        "PRED and TRUE are two videos, or two folders holding videos with the same file names.",
    )
    p.add_argument("pred", help="generated video, or folder of them")
    p.add_argument("true", help="ground-truth video, or folder of them")
    p.add_argument("--json", default=None, help="also write the per-video and mean metrics here")
    p.add_argument("--lpips-weights", default=None, metavar="DIR",
                   help="also LPIPS, with these weights (anim-jax convert-metric lpips)")
    p.add_argument("--lpips-disco", action="store_true",
                   help="LPIPS on [0, 1] inputs as DisCo's code did (biased; only to compare with those tables)")
    p.add_argument("--fvd-weights", default=None, metavar="DIR",
                   help="also FVD over the set (at least 2 videos), with these I3D weights (anim-jax convert-metric i3d)")
    p.add_argument("--fvd-clips", choices=("first", "segments", "whole"), default="first",
                   help="each video's I3D clip: its first 16 frames (default), its 16-frame segments averaged, "
                        "or all frames as one clip")
    p.set_defaults(func=run_evaluate)
    return p


def run_evaluate(args: argparse.Namespace) -> int:
    from anim_jax import media

    from anim_jax import storage

    pred, true = storage.as_path(args.pred), storage.as_path(args.true)  # local or gs://
    try:
        if pred.is_dir() and true.is_dir() and any(p.suffix.lower() in media.VIDEO_SUFFIXES for p in pred.iterdir()):
            names = sorted(p.name for p in pred.iterdir() if p.suffix.lower() in media.VIDEO_SUFFIXES)
            missing = [n for n in names if not (true / n).exists()]
            if missing:
                raise ValueError(f"{true} has no ground truth for {', '.join(missing[:5])}")
            pairs = [(pred / n, true / n) for n in names]
        else:
            pairs = [(pred, true)]
        if args.fvd_weights and len(pairs) < 2:
            raise ValueError("FVD compares two sets of videos: give folders with at least 2 videos each")
        lpips_model = fvd_model = None
        if args.lpips_weights:
            from anim_jax.metrics.lpips import load_lpips

            lpips_model = load_lpips(args.lpips_weights)
        if args.fvd_weights:
            from anim_jax.metrics.fvd import load_i3d

            fvd_model = load_i3d(args.fvd_weights)
        results, videos = {}, []
        for p, t in pairs:
            a, b = _read_video(p), _read_video(t)
            n = min(len(a), len(b))
            if len(a) != len(b):
                print(f"warning: {p.name}: {len(a)} generated vs {len(b)} true frames; comparing the first {n}",
                      file=sys.stderr)
            m = video_metrics(a[:n], b[:n])
            if lpips_model is not None:
                from anim_jax.metrics.lpips import lpips_video

                m.lpips = lpips_video(lpips_model, a[:n], b[:n], disco_compatible=args.lpips_disco)
            results[p.name] = m
            if fvd_model is not None:
                videos.append((a[:n], b[:n]))
        summary = mean_metrics(list(results.values()))
        if fvd_model is not None:
            from anim_jax.metrics.fvd import fvd

            summary["fvd"] = fvd(fvd_model, [v[0] for v in videos], [v[1] for v in videos], clips=args.fvd_clips)
            summary["fvd_clips"] = args.fvd_clips
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(k) for k in results)
    extra = "  LPIPS" if "lpips" in summary else ""
    print(f"{'video':<{width}}  {'PSNR':>7}  {'SSIM':>6}  {'L1':>7}{extra:>8}")
    for name, m in results.items():
        print(f"{name:<{width}}  {m.psnr:7.3f}  {m.ssim:6.4f}  {m.l1:7.5f}" + (f"  {m.lpips:6.4f}" if extra else ""))
    print(f"{'mean':<{width}}  {summary['psnr']:7.3f}  {summary['ssim']:6.4f}  {summary['l1']:7.5f}"
          + (f"  {summary['lpips']:6.4f}" if extra else ""))
    if "fvd" in summary:
        print(f"FVD ({len(results)} videos per set, clips: {summary['fvd_clips']}): {summary['fvd']:.3f}")
    if args.json:
        from anim_jax import atomic

        text = json.dumps({"videos": {k: m.as_dict() for k, m in results.items()}, "mean": summary}, indent=2)
        atomic.write_text(args.json, text)
    return 0
