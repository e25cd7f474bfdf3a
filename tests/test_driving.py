"""``anim-jax animate --driving-video`` and ``AnimatePipeline(..., driving_video=...)``: a dance video
through tiny random DWPose networks, alignment, Moore's drawing and a tiny random Animate Anyone model;
and the native settings a weights directory records and ``animate`` falls back to.

Random networks give meaningless poses and videos: what is tested is the plumbing (the frames that
reach the sampler are the drawing of the aligned keypoints, the files and frame counts, the defaults).
"""

import os
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pose_helpers as ph  # noqa: E402
from helpers import subprocess_xla_flags  # noqa: E402
from test_pipeline import components  # noqa: E402,F401  (the tiny Animate Anyone model, a fixture)

from anim_jax import cli, media, native  # noqa: E402
from anim_jax.convert.components import save_components  # noqa: E402
from anim_jax.pipeline import AnimatePipeline  # noqa: E402
from anim_jax.pose.align import align_poses  # noqa: E402
from anim_jax.pose.extract import PoseExtractor  # noqa: E402

# Small detection sizes keep the tiny networks fast (DWPose's own are 512 and 640); the same as
# test_pose_extract.py, so a whole-suite run reuses its compiled networks.
SMALL = dict(batch_size=8, detect_resolution=64, detector_input=(128, 128))
CLI_SMALL = ["--detect-resolution", "64", "--detector-size", "128"]
# What the tiny directory says it is made for: animate falls back to these when given no flags.
TINY_NATIVE = native.NativeSettings(width=24, height=32, steps=2, guidance_scale=2.0, context_frames=4)
FRAMES = 6


def dancer(num_frames: int, height: int = 72, width: int = 96) -> np.ndarray:
    """(F, H, W, 3) uint8: a stick figure waving its arms and stepping sideways on a grey floor."""
    out = []
    for t in range(num_frames):
        img = np.full((height, width, 3), 90, np.uint8)
        cx, a = 40 + 2 * t, 0.5 * np.sin(t)
        head, hip = (cx, 16), (cx, 44)
        cv2.circle(img, head, 6, (230, 200, 160), -1)
        cv2.line(img, (cx, 22), hip, (40, 40, 200), 4)
        for side in (-1, 1):
            hand = (int(cx + side * 16 * np.cos(a)), int(28 - 12 * np.sin(a)))
            cv2.line(img, (cx, 26), hand, (40, 180, 40), 3)
            cv2.line(img, hip, (cx + side * (8 + t), 66), (200, 60, 40), 3)
        out.append(img)
    return np.stack(out)


def frame_count(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def frame_size(path) -> tuple[int, int]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.height, s.width


@pytest.fixture(scope="module")
def setup(components, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("driving")
    weights = root / "weights"
    save_components(weights, components, schedule=AnimatePipeline(**components).schedule,
                    extra={native.KEY: TINY_NATIVE.to_json()})
    dwpose = ph.tiny_dwpose(root / "dwpose", confident_keypoints=True)
    video = dancer(FRAMES)
    media.write_mp4(root / "dance.mp4", video, fps=10)
    reference = dancer(1, 80, 60)[0]
    Image.fromarray(reference).save(root / "ref.png")
    return root, weights, dwpose


def test_cli_driving_video_writes_video_grid_and_poses(setup, tmp_path):
    """The real entry point in a fresh process: no size/steps flags, so the directory's native settings
    apply; --cpu-devices makes the two devices that --devices asks for (XLA's default is one)."""
    root, weights, dwpose = setup
    out = tmp_path / "out" / "result.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "anim_jax.cli", "animate", "--weights", str(weights), "--reference", str(root / "ref.png"),
         "--driving-video", str(root / "dance.mp4"), "--pose-weights", str(dwpose), "--out", str(out),
         "--grid", "--save-poses", "--cpu-devices", "2", "--devices", "2", *CLI_SMALL],
        capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": subprocess_xla_flags()},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiling the sampler for 24x32x4" in proc.stderr
    assert frame_count(out) == FRAMES and frame_size(out) == (TINY_NATIVE.height, TINY_NATIVE.width)
    grid = out.with_name("result_grid.mp4")
    assert frame_count(grid) == FRAMES
    h, w = frame_size(grid)
    assert h >= 256 and w > 3 * 256  # four labelled panels, each upscaled to at least 256 px
    assert frame_count(out.with_name("result_pose.mp4")) == FRAMES
    with np.load(out.with_name("result_keypoints.npz")) as z:
        assert z["keypoints"].shape == (FRAMES, 1, 133, 2)
        assert tuple(z["image_size"]) == (80, 60)  # aligned: in the reference image's pixels
    with np.load(out.with_name("result_driving_keypoints.npz")) as z:
        assert z["keypoints"].shape[0] == FRAMES and tuple(z["image_size"]) == (72, 96)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["result.mp4", "result_grid.mp4", "result_pose.mp4", "result_keypoints.npz", "result_driving_keypoints.npz"])
    # (the mp4s' mode is media.write_mp4's, on its way to the shared atomic writer)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in out.parent.glob("*.npz"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_python_api_draws_the_aligned_keypoints(setup, devices):
    root, weights, dwpose = setup
    pipe = AnimatePipeline.from_pretrained(weights)
    assert pipe.native == TINY_NATIVE
    extractor = PoseExtractor.from_pretrained(dwpose, **SMALL)
    video = dancer(FRAMES)
    ref = np.asarray(Image.open(root / "ref.png"))
    result = pipe(ref, driving_video=video, pose_extractor=extractor, num_frames=4, steps=1)
    # What the sampler was driven by = the extractor's keypoints, aligned, drawn; computed here step by step.
    expected = align_poses(extractor(video[:4]), extractor(ref[None]))
    pictures = np.stack(list(expected.render()))
    np.testing.assert_array_equal(result.driving.pictures, pictures)
    np.testing.assert_array_equal(result.poses, np.stack([media.resize_lanczos(Image.fromarray(p), 24, 32) for p in pictures]))
    assert result.frames.shape == (4, 32, 24, 3)
    # Without alignment the dancer's own keypoints are drawn, on the driving video's canvas.
    plain = pipe(ref, driving_video=video, pose_extractor=extractor, num_frames=4, steps=1, align=False)
    np.testing.assert_array_equal(plain.driving.pictures, np.stack(list(extractor(video[:4]).render())))
    assert not np.array_equal(plain.frames, result.frames)


def test_reference_from_a_video_frame(setup):
    root, _, _ = setup
    from anim_jax.driving import reference_image

    frames = [np.asarray(f) for f in media.read_video_frames(root / "dance.mp4")[0]]
    np.testing.assert_array_equal(np.asarray(reference_image(root / "dance.mp4", 3)), frames[3])
    with pytest.raises(media.InputError, match="past its end"):
        reference_image(root / "dance.mp4", FRAMES)


def test_old_directories_fall_back_to_moore():
    assert native.from_config({}) == native.MOORE == native.NativeSettings(512, 768, 25, 3.5, 24)
    assert native.from_config({"native": {"width": 64, "height": 64}}) == native.NativeSettings(64, 64, 25, 3.5, 24)


@pytest.mark.parametrize("problem", ["missing", "not_a_video", "no_weights", "both", "neither"])
def test_bad_driving_arguments_one_line_exit_2(setup, tmp_path, capsys, problem):
    root, weights, dwpose = setup
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    video = {"missing": tmp_path / "nothing.mp4", "not_a_video": tmp_path / "junk.mp4"}.get(problem, root / "dance.mp4")
    args = ["animate", "--weights", str(weights), "--reference", str(root / "ref.png"), "--out", str(tmp_path / "o.mp4")]
    if problem != "neither":
        args += ["--driving-video", str(video)]
    if problem != "no_weights":
        args += ["--pose-weights", str(dwpose)]
    if problem == "both":
        args += ["--pose", str(root / "dance.mp4")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    expected = {"missing": "--driving-video .*does not exist", "not_a_video": "--driving-video: .*junk.mp4.* not a readable video",
                "no_weights": "needs --pose-weights", "both": "either --pose", "neither": "either --pose"}[problem]
    assert __import__("re").search(expected, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.mp4"]  # nothing written


def test_grid_panels_are_labelled_and_upscaled():
    from anim_jax.driving import GRID_LABELS, grid

    rng = np.random.default_rng(0)
    ref, drive = rng.integers(0, 256, (40, 30, 3), np.uint8), rng.integers(0, 256, (3, 36, 48, 3), np.uint8)
    poses, result = rng.integers(0, 256, (3, 32, 24, 3), np.uint8), rng.integers(0, 256, (3, 32, 24, 3), np.uint8)
    g = grid(ref, drive, poses, result)
    widths = [round(w * 256 / h) for h, w in (ref.shape[:2], drive.shape[1:3], poses.shape[1:3], result.shape[1:3])]
    strip = g.shape[1] - 256
    assert g.shape == (3, 256 + strip, sum(widths) + 3 * 4, 3) and strip >= 12
    x = sum(widths[:3]) + 3 * 4  # the result panel, below its label strip
    expected = np.asarray(Image.fromarray(result[1]).resize((widths[3], 256), Image.LANCZOS))
    np.testing.assert_array_equal(g[1, strip:, x:], expected)
    starts = np.cumsum([0] + [w + 4 for w in widths[:3]])
    for (x0, w), label in zip(zip(starts, widths), GRID_LABELS):
        label_area = g[:, :strip, x0:x0 + w]
        assert (label_area > 200).any() and (label_area == 24).mean() > 0.5, label  # light text on a dark strip
