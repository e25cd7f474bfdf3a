"""Pose alignment on synthetic skeletons with known proportions and joint angles."""

import numpy as np
import pytest

from anim_jax.pose.align import BODY_PARTS, BONES, NECK, align_keypoints, align_poses, part_scales, smooth
from anim_jax.pose.extract import Poses

BODY_BONES = [(p, c, part) for p, c, part in BONES if part in BODY_PARTS]


def skeleton(rng, lengths: dict, neck, frames: int, jitter_angles=True):
    """(F, 133, 2) keypoints built bone by bone from per-bone lengths and random directions (shoulders
    kept opposite, so the neck is their midpoint as DWPose defines it), and the directions used."""
    kp = np.zeros((frames, 134, 2))
    kp[:, NECK] = neck
    dirs = {}
    for p, c, part in BONES:
        angle = rng.uniform(-np.pi, np.pi, frames) if jitter_angles else np.full(frames, rng.uniform(-np.pi, np.pi))
        if (p, c) == (NECK, 6):
            angle = dirs[(NECK, 5)] + np.pi
        dirs[(p, c)] = angle
        kp[:, c] = kp[:, p] + lengths[(p, c)] * np.stack([np.cos(angle), np.sin(angle)], -1)
    return kp[:, :133], dirs


def random_lengths(rng, lo, hi):
    lengths = {(p, c): rng.uniform(lo, hi) for p, c, _ in BONES}
    lengths[(NECK, 6)] = lengths[(NECK, 5)]  # the neck is the shoulders' midpoint
    return lengths


def bone_length(kp, p, c):
    neck = kp[..., [5, 6], :].mean(-2)
    a = neck if p == NECK else kp[..., p, :]
    return np.linalg.norm(kp[..., c, :] - a, axis=-1)


def bone_angle(kp, p, c):
    neck = kp[..., [5, 6], :].mean(-2)
    d = kp[..., c, :] - (neck if p == NECK else kp[..., p, :])
    return np.degrees(np.arctan2(d[..., 1], d[..., 0]))


def angle_diff(a, b):
    return np.abs((a - b + 180) % 360 - 180)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    ref_len, drv_len = random_lengths(rng, 20, 60), random_lengths(rng, 5, 30)
    ref, _ = skeleton(rng, ref_len, (300.0, 200.0), 1)
    # A dancer with other proportions: constant bone lengths, changing angles, a moving neck.
    drv_neck = np.stack([100 + 10 * np.arange(6), 80 + 3 * np.arange(6)], -1)
    drv, _ = skeleton(rng, drv_len, drv_neck, 6)
    return ref[0], np.ones(133, np.float32), drv, np.ones((6, 133), np.float32), ref_len, drv_len


def test_limb_lengths_from_reference_angles_from_driving(case):
    ref, ref_sc, drv, drv_sc, ref_len, drv_len = case
    out = align_keypoints(drv, drv_sc, ref, ref_sc)
    for p, c, part in BODY_BONES:
        np.testing.assert_allclose(bone_length(out, p, c), ref_len[(p, c)], atol=1.0, err_msg=part)
    for p, c, part in BONES:  # every bone, body, hands and face, keeps the driving direction
        assert angle_diff(bone_angle(out, p, c), bone_angle(drv, p, c)).max() < 0.5, part
    # Hands and the face: one factor each, so their total size is the reference's.
    for part in ("hand_l", "hand_r", "face"):
        bones = [(p, c) for p, c, q in BONES if q == part]
        size = sum(bone_length(out, p, c) for p, c in bones)
        np.testing.assert_allclose(size, sum(ref_len[b] for b in bones), rtol=1e-9)
    # The neck starts on the reference's and follows the driving neck at the global scale.
    neck = out[:, [5, 6]].mean(1)
    np.testing.assert_allclose(neck[0], ref[[5, 6]].mean(0), atol=1e-9)
    _, scale = part_scales(ref, ref_sc, drv[0], drv_sc[0])
    expected = sum(ref_len[(p, c)] for p, c, _ in BODY_BONES) / sum(drv_len[(p, c)] for p, c, _ in BODY_BONES)
    assert scale == pytest.approx(expected)
    drv_neck = drv[:, [5, 6]].mean(1)
    np.testing.assert_allclose(neck - neck[0], scale * (drv_neck - drv_neck[0]), atol=1e-9)


def test_missing_joints(case):
    ref, ref_sc, drv, drv_sc, ref_len, drv_len = case
    # Reference without a left elbow: the left upper arm takes the right upper arm's factor.
    ref_sc2 = ref_sc.copy()
    ref_sc2[7] = 0.1
    factors, _ = part_scales(ref, ref_sc2, drv[0], drv_sc[0])
    assert factors["upper_arm_l"] == pytest.approx(ref_len[(6, 8)] / drv_len[(6, 8)])
    # Driving frame 2 without its left elbow: the elbow is not drawn (score kept), the wrist hangs
    # from the shoulder in the driving direction at the mean arm factor.
    drv_sc2 = drv_sc.copy()
    drv_sc2[2, 7] = 0.1
    out = align_keypoints(drv, drv_sc2, ref, ref_sc)
    f = (ref_len[(5, 7)] / drv_len[(5, 7)] + ref_len[(7, 9)] / drv_len[(7, 9)]) / 2
    np.testing.assert_allclose(out[2, 9] - out[2, 5], f * (drv[2, 9] - drv[2, 5]), atol=1e-9)
    np.testing.assert_allclose(bone_length(out[3], 7, 9), ref_len[(7, 9)], atol=1e-9)  # other frames unchanged
    # A driving frame without a neck keeps the neck of the nearest frame that has one.
    drv_sc3 = drv_sc.copy()
    drv_sc3[4, 6] = 0.0
    out3 = align_keypoints(drv, drv_sc3, ref, ref_sc)
    np.testing.assert_allclose(out3[4, 0] - out[3, 0], out3[4, 0] - out3[3, 0])  # same anchor as frame 3
    assert np.isfinite(out3).all()
    # No neck in the reference: a clear error.
    ref_sc4 = ref_sc.copy()
    ref_sc4[5] = 0.0
    with pytest.raises(ValueError, match="reference pose has no neck"):
        align_keypoints(drv, drv_sc, ref, ref_sc4)


def test_align_poses_and_smoothing(case):
    ref, ref_sc, drv, drv_sc, _, _ = case
    reference = Poses(ref[None, None], ref_sc[None, None], np.array([1]), (480, 640), (512, 640))
    kp = np.concatenate([drv[:3], np.zeros((1, 133, 2)), drv[3:]])[:, None]
    sc = np.concatenate([drv_sc[:3], np.zeros((1, 133), np.float32), drv_sc[3:]])[:, None]
    driving = Poses(kp, sc, np.array([1, 1, 1, 0, 1, 1, 1]), (90, 160), (512, 896), 24.0)
    aligned = align_poses(driving, reference)
    assert aligned.image_size == (480, 640) and aligned.detect_size == (512, 640) and aligned.fps == 24.0
    assert aligned.num_persons.tolist() == [1, 1, 1, 0, 1, 1, 1]
    np.testing.assert_array_equal(aligned.keypoints[[0, 1, 2, 4, 5, 6], 0], align_keypoints(drv, drv_sc, ref, ref_sc))
    assert next(aligned.render()).shape == (512, 640, 3)
    # Smoothing is off by default; a 3-frame window averages each point with its present neighbours.
    sc2 = drv_sc.copy()
    sc2[2, 40] = 0.0  # absent in frame 2: left out of its neighbours' averages, itself unchanged
    sm = smooth(drv, sc2, 3)
    np.testing.assert_allclose(sm[1:-1, :40], (drv[:-2, :40] + drv[1:-1, :40] + drv[2:, :40]) / 3, atol=1e-12)
    np.testing.assert_allclose(sm[0, 0], (drv[0, 0] + drv[1, 0]) / 2, atol=1e-12)
    np.testing.assert_allclose(sm[3, 40], (drv[3, 40] + drv[4, 40]) / 2, atol=1e-12)
    np.testing.assert_array_equal(sm[2, 40], drv[2, 40])
    np.testing.assert_array_equal(align_keypoints(drv, sc2, ref, ref_sc, smooth_window=3),
                                  align_keypoints(sm, sc2, ref, ref_sc))  # fmt: skip
    with pytest.raises(ValueError, match="odd"):
        align_keypoints(drv, drv_sc, ref, ref_sc, smooth_window=2)
