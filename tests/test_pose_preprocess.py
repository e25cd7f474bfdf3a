"""DWPose's host-side processing and Moore's drawing, against what Moore's own code produced.

``tests/data/dwpose_moore/moore_ref.npz`` holds the outputs of Moore-AnimateAnyone's ``src/dwpose``
(run beside the project; see the README there) on inputs that ``pose_helpers`` regenerates here.
Every comparison is exact: same pixels, same float64 numbers, same SHA-256 of network inputs.
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pose_helpers as ph  # noqa: E402
from anim_jax.pose import preprocess as pp  # noqa: E402
from anim_jax.pose.extract import PoseExtractor  # noqa: E402
from anim_jax.pose.render import render_pose  # noqa: E402

REF = os.path.join(os.path.dirname(__file__), "data", "dwpose_moore", "moore_ref.npz")
PIPE_SIZES = [(120, 160), (300, 200), (900, 700), (512, 512), (96, 200)]
PRE_SIZES = [(37, 53), (300, 200), (900, 700), (512, 512), (720, 1280), (100, 37)]


@pytest.fixture(scope="module")
def ref():
    with np.load(REF) as z:
        return dict(z)


def test_resize_letterbox_and_crops_match_moore(ref):
    for t, (h, w) in enumerate(PRE_SIZES):
        img = ph.synthetic_frame(h, w, f"pre{t}")
        det = pp.resize_for_detection(img)
        assert ph.digest(det) == ref[f"pre_det_{t}"], f"case {t}: detection resize differs"
        boxed, r = pp.letterbox(det)
        assert r == ref[f"pre_ratio_{t}"]
        assert ph.digest(boxed) == ref[f"pre_boxed_{t}"], f"case {t}: letterbox differs"
        center, scale = pp.crop_transforms(ref[f"pre_boxes_{t}"])
        np.testing.assert_array_equal(center, ref[f"pre_centers_{t}"])
        np.testing.assert_array_equal(scale, ref[f"pre_scales_{t}"])
        for j in range(len(center)):
            crop = pp.crop_person(det, center[j], scale[j])
            assert crop.shape == (384, 288, 3) and crop.dtype == np.uint8
            assert ph.digest(crop) == ref[f"pre_crops_{t}"][j], f"case {t} box {j}: crop differs"


def test_detection_decode_matches_moore(ref):
    for t in range(6):
        raw = ph.decode_case(f"dec{t}")
        boxes = pp.decode_detections(raw, float(ref[f"dec_ratio_{t}"]))
        expected = ref[f"dec_boxes_{t}"]
        assert len(expected) > 1  # the cases exercise NMS among several persons
        np.testing.assert_array_equal(boxes, expected)
        np.testing.assert_array_equal(pp.decode_detections(raw[:, :6], float(ref[f"dec_ratio_{t}"])), expected)


def test_simcc_decode_matches_moore(ref):
    for t in range(4):
        sx, sy = ph.simcc_case(f"sim{t}")
        center = ph.uniform(f"center{t}", (3, 2)) * 500
        scale = 50 + ph.uniform(f"scale{t}", (3, 2)) * 350
        locs, vals = pp.simcc_maximum(sx, sy)
        kp, sc = pp.keypoints_from_simcc(locs, vals, center, scale)
        np.testing.assert_array_equal(kp, ref[f"sim_kp_{t}"])
        np.testing.assert_array_equal(sc, ref[f"sim_sc_{t}"])


def test_simcc_maximum_on_device_equals_numpy():
    import jax.numpy as jnp

    sx, sy = ph.simcc_case("device", n=2)
    sx[0, 20, 5] = sx[0, 20, 9] = 3.0  # a tie: the first index wins, as in numpy
    locs, vals = pp.simcc_maximum(sx, sy)
    dl = jnp.stack([jnp.argmax(sx, -1), jnp.argmax(sy, -1)], -1).astype(jnp.float32)
    dv = jnp.minimum(jnp.max(sx, -1), jnp.max(sy, -1))
    np.testing.assert_array_equal(np.asarray(dl), locs)
    np.testing.assert_array_equal(np.asarray(dv), vals)
    assert locs[0, 20, 0] == 5


def test_rendering_matches_moore_draw_pose(ref):
    """40 random keypoint sets (1-3 persons, points off-canvas, on whole pixels, scores at 0.3)
    through Moore's DWposeDetector drawing: Moore's person choice and identical pixels."""
    for t in range(40):
        (h, w), kp, sc = ph.draw_case(f"draw{t}")
        best = pp.select_person(kp, sc)
        _, body_scores = pp.moore_layout(kp[best : best + 1], sc[best : best + 1])
        np.testing.assert_array_equal(body_scores[:, :18], ref[f"draw_body_score_{t}"])
        image = render_pose(kp[best], sc[best], (h, w))
        expected = ref[f"draw_map_{t}"]
        assert expected.any()
        diff = np.argwhere((image != expected).any(-1))
        assert len(diff) == 0, f"case {t}: {len(diff)} pixels differ, first at {diff[:3].tolist()}"


def _fake_extractor(ref, **kwargs):
    plants = {d: ref[f"pipe_plants_{i}"] for i, d in enumerate(ref["pipe_det_digests"])}
    return PoseExtractor(None, None, networks=ph.FakeNetworks(plants, batch_size=2), **kwargs)


def test_extractor_pipeline_matches_moore(ref):
    """Frames of five sizes (enlarged and shrunk) through the whole extractor with stand-in networks:
    same letterboxed inputs and crops, same keypoints, same chosen person, same picture as Moore."""
    frames = [ph.synthetic_frame(h, w, f"pipe{i}") for i, (h, w) in enumerate(PIPE_SIZES)]
    # Moore runs the pose network on the whole frame when nobody is detected (frame 2).
    extractor = _fake_extractor(ref, no_person="full_image", all_persons=True)
    results = list(extractor.stream(enumerate(frames)))
    assert list(extractor.networks.seen) == list(ref["pipe_det_digests"])
    for i, r in enumerate(results):
        kp134, sc134 = ref[f"pipe_kp134_{i}"], ref[f"pipe_sc134_{i}"]
        det_h, det_w = r.detect_size
        assert ref[f"pipe_map_{i}"].shape[:2] == (det_h, det_w)
        # Back to detection pixels: the scaling to source pixels is exact here up to float rounding.
        det_kp = r.keypoints * np.array([det_w / r.image_size[1], det_h / r.image_size[0]])
        kp, sc = pp.moore_layout(det_kp, r.scores)
        np.testing.assert_allclose(kp, kp134, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(sc, sc134)
    single = _fake_extractor(ref, no_person="full_image")
    poses = [single(f) for f in frames]
    for i, p in enumerate(poses):
        assert p.num_persons.tolist() == [1]
        kp, sc = p.openpose_body()
        np.testing.assert_array_equal(sc[0], ref[f"pipe_body_score_{i}"])
        image = p.render_frame(0)
        diff = np.argwhere((image != ref[f"pipe_map_{i}"]).any(-1))
        assert len(diff) == 0, f"frame {i}: {len(diff)} pixels differ, first at {diff[:3].tolist()}"


def test_no_person_gives_an_empty_pose(ref):
    frame = ph.synthetic_frame(*PIPE_SIZES[2], "pipe2")  # the detector stand-in finds nobody here
    poses = _fake_extractor(ref)(frame)
    assert poses.num_persons.tolist() == [0] and poses.frames_without_person == [0]
    image = poses.render_frame(0)
    assert image.shape == (*poses.detect_size, 3) and not image.any()
    assert poses.render_frame(0, "source").shape == (900, 700, 3)
