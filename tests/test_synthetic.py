"""Synthetic characters and their OpenPose-style pose renderings."""

import os

import numpy as np
import pytest

from data_pipelines import cli, dataset as dataset_lib, synthetic, video_io


def test_deterministic_by_seed():
    a = synthetic.render_video(5, 2, num_frames=6, height=48, width=40)
    b = synthetic.render_video(5, 2, num_frames=6, height=48, width=40)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = synthetic.render_video(5, 3, num_frames=6, height=48, width=40)
    d = synthetic.render_video(6, 2, num_frames=6, height=48, width=40)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    frames, poses, kps = a
    assert frames.shape == poses.shape == (6, 48, 40, 3) and frames.dtype == poses.dtype == np.uint8
    assert kps.shape == (6, 18, 2)


def test_characters_vary():
    chars = [synthetic.make_character(synthetic._rng(0, i)) for i in range(12)]
    for key in ("height", "head_r", "shoulder", "upper_arm", "thigh", "limb_w"):
        vals = [c[key] for c in chars]
        assert max(vals) / min(vals) > 1.1, key  # proportions differ
    for key in ("skin", "top", "bottom", "bg"):
        assert len({c[key] for c in chars}) >= 8, key  # colours differ
    assert len({c["top_pattern"] for c in chars}) >= 3  # textures differ
    # body proportions show up in the keypoints: shoulder widths differ between characters
    widths = [np.linalg.norm(np.subtract(*synthetic.keypoints(c, 0.0, 64, 64)[[2, 5]])) for c in chars]
    assert max(widths) / min(widths) > 1.2


def test_motion_is_smooth_and_articulated():
    _, _, kps = synthetic.render_video(1, 0, num_frames=48, height=64, width=64)
    step = np.linalg.norm(np.diff(kps, axis=0), axis=-1)  # (47, 18) per-frame joint displacement
    assert step.max() < 0.1 * 64 and step.mean() < 0.03 * 64  # no jumps between consecutive frames
    travel = np.linalg.norm(kps.max(0) - kps.min(0), axis=-1)
    assert (travel[[4, 7]] > 0.1 * 64).all()  # wrists move a lot
    # articulated: the elbow angle changes over time (not a rigid translation)
    def angle(t, a, b, c):
        u, v = kps[t, a] - kps[t, b], kps[t, c] - kps[t, b]
        return np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v))

    elbow = [angle(t, 2, 3, 4) for t in range(48)]
    assert np.ptp(elbow) > 0.3
    # keypoints stay inside the image
    assert kps.min() > -2 and kps.max() < 66


def test_pose_rendering_uses_openpose_colours():
    h = w = 256
    char = synthetic.make_character(synthetic._rng(2, 0))
    kp = synthetic.keypoints(char, 3.0, h, w)
    pose = synthetic.render_pose(kp, h, w)
    colours = {tuple(c) for c in synthetic.COLORS}
    joints_ok = sum(tuple(pose[int(y), int(x)]) == synthetic.COLORS[i] for i, (x, y) in enumerate(kp))
    assert joints_ok >= 15  # joints drawn last in their full colour (a few may overlap at the face)
    limbs_ok = 0
    for i, (a, b) in enumerate(synthetic.LIMBS[:17]):
        x, y = (kp[a] + kp[b]) / 2
        px = tuple(int(v) for v in pose[int(y), int(x)])
        limbs_ok += px == tuple(int(c * 0.6) for c in synthetic.COLORS[i])
    assert limbs_ok >= 10  # limbs at 0.6 of the colour, as DWPose draws them
    assert (pose.sum(-1) == 0).mean() > 0.8  # black background
    assert len(colours & {tuple(p) for p in pose.reshape(-1, 3)}) >= 15
    assert len(synthetic.LIMBS) == 19 and len(synthetic.COLORS) == 18


def test_character_is_drawn_where_the_skeleton_is():
    h = w = 96
    char = synthetic.make_character(synthetic._rng(4, 1))
    frames, poses, kps = synthetic.render_video(4, 1, num_frames=3, height=h, width=w)
    bg = synthetic._background(char, h, w)
    for frame, kp in zip(frames, kps):
        diff = np.abs(frame.astype(int) - bg).sum(-1) > 30
        inside = [diff[int(y), int(x)] for x, y in kp[[1, 8, 11, 9, 12]]]  # neck, hips, knees
        assert sum(inside) >= 4
        assert 0.02 < diff.mean() < 0.5  # a figure, not the whole frame


def test_write_videos_lossless_layout(tmp_path):
    root = tmp_path / "vids"
    paths = synthetic.write_synthetic_videos(root, 2, seed=9, num_frames=5, height=32, width=24, fps=12)
    assert sorted(os.listdir(root)) == ["char_00000.mp4", "char_00001.mp4"]
    assert sorted(os.listdir(str(root) + "_dwpose")) == ["char_00000.mp4", "char_00001.mp4"]
    frames, poses, _ = synthetic.render_video(9, 1, num_frames=5, height=32, width=24)
    got, fps = video_io.read_video(paths[1][0])
    got_pose, _ = video_io.read_video(paths[1][1])
    np.testing.assert_array_equal(got, frames)
    np.testing.assert_array_equal(got_pose, poses)
    assert fps == pytest.approx(12)


def test_write_dataset_directly(tmp_path):
    path = synthetic.write_synthetic_dataset(tmp_path / "ds", 3, seed=1, num_frames=5, height=32, width=32)
    src = dataset_lib.open_dataset(path)
    assert len(src) == 3
    recs = {src[i]["id"].decode(): src[i] for i in range(3)}
    assert set(recs) == {"char_00000", "char_00001", "char_00002"}
    _, poses, _ = synthetic.render_video(1, 2, num_frames=5, height=32, width=32)
    r = recs["char_00002"]
    assert r["num_frames"] == 5 and r["height"] == r["width"] == 32
    np.testing.assert_array_equal(np.stack([video_io.decode_image(b) for b in r["poses"]]), poses)
    assert dataset_lib.read_report(path)["source"] == "synthetic"


def test_cli_make_synthetic_then_prepare(tmp_path):
    root, ds, ds2 = str(tmp_path / "v"), str(tmp_path / "ds"), str(tmp_path / "ds2")
    assert cli.main(["make-synthetic", "-n", "2", "--videos", root, "--dataset", ds2, "--frames", "4", "--size", "24"]) == 0
    assert cli.main(["prepare", root, "-o", ds, "--workers", "0", "--no-progress"]) == 0
    a, b = dataset_lib.open_dataset(ds), dataset_lib.open_dataset(ds2)
    assert len(a) == len(b) == 2
    assert cli.main(["prepare", root, "-o", ds, "--workers", "0", "--no-progress"]) == 2  # exists: a usage error
    assert cli.main(["make-synthetic", "-n", "1"]) == 2  # no output named


def test_background_kinds_can_be_restricted():
    default = [synthetic.make_character(synthetic._rng(0, i))["bg_pattern"] for i in range(24)]
    assert set(default) <= set(synthetic.DEFAULT_BACKGROUNDS) and len(set(default)) >= 3
    frames, _, kps = synthetic.render_video(0, 1, num_frames=3, height=32, width=32, backgrounds=("plain",))
    # a plain background: the corners (away from the character) are one colour in every frame
    corners = frames[:, [0, 0, -1, -1], [0, -1, 0, -1]].reshape(-1, 3)
    assert (corners == corners[0]).all()
    # everything but the background is the default draw's: same motion
    np.testing.assert_array_equal(kps, synthetic.render_video(0, 1, num_frames=3, height=32, width=32)[2])
    with pytest.raises(ValueError, match="subset"):
        synthetic.check_backgrounds(["stripes"])
    assert cli.main(["make-synthetic", "-n", "1", "--dataset", os.devnull + "x", "--backgrounds", "plain,wavy"]) == 2


def test_part_maps_match_the_picture():
    """The part map labels each pixel with the part whose colour it shows (palette mode, plain clothes)."""
    char = synthetic.make_character(synthetic._rng(0, 5), ("plain",), "train")
    char["top_pattern"] = char["bottom_pattern"] = "plain"
    motion = synthetic.make_character(synthetic._rng(1, 7), ("plain",), "train")
    perf = synthetic.performance(char, motion, 2, 64, 64, start=3)
    assert perf["frames"].shape == (2, 64, 64, 3) and perf["parts"].shape == (2, 64, 64)
    frame, parts = perf["frames"][1], perf["parts"][1]
    colours = {"top": char["top"], "bottom": char["bottom"], "skin": char["skin"], "background": char["bg"]}
    for name, colour in colours.items():
        mask = parts == synthetic.PART_INDEX[name]
        # edges are box-filtered (anti-aliased) while the map is sampled at pixel centres: most, not all,
        # labelled pixels carry the part's exact colour, and its median is that colour
        close = np.abs(frame[mask].astype(int) - np.array(colour)).max(axis=1) <= 16
        assert mask.sum() >= 6 and close.mean() > 0.6, (name, mask.sum(), close.mean())
        np.testing.assert_allclose(np.median(frame[mask], axis=0), colour, atol=6)
    # the motion is the other character's: same keypoints as that character at those times
    np.testing.assert_allclose(perf["keypoints"][0], synthetic.keypoints(dict(char, motion=motion["motion"], x=motion["x"]), 3.0, 64, 64))
