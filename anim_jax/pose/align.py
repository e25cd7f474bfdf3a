"""Pose alignment (retargeting): the driving dancer's motion on the reference character's body.

Moore-AnimateAnyone renders the driving poses as detected, so a tall dancer stretches a short
character (its README limitation 2, issues #73 and #125); MusePose ships ``pose_align.py`` for this.
Here the driving keypoints are rebuilt along the kinematic chain, rooted at the neck:

* **Per-part scales**, from the reference pose and one driving frame (the first with a visible neck by
  default): for each part the reference's length over the driving's (summed over the part's bones
  visible in both): neck (neck -> nose), shoulders, torso (neck -> hips), upper and lower arms and
  legs, feet, each hand (all its bones, one factor) and the face (eyes, ears and the 68 landmarks,
  one factor). Left and right are separate parts.
* **Along the chain**: every bone keeps its direction in every frame and gets its part's factor,
  child = aligned parent + factor * (child - parent), so joint angles are those of the driving frame
  and the body's proportions those of the reference.
* **Placement**: the neck starts where the reference's neck is and moves by the driving neck's
  displacement times a global scale (the reference's summed body-limb length over the driving's).

Missing joints (score <= ``threshold``; the neck counts as missing unless both shoulders are there):
* in the reference or the scale frame, a part with no bone visible in both takes its mirror part's
  factor (left <-> right), else the global scale; a reference without a neck is an error;
* in a driving frame, a missing joint keeps its (low) score, so it is not drawn, and joints below it
  are placed from their nearest present ancestor with the mean factor of the bones in between;
  a frame without a neck takes the neck displacement of the nearest frame that has one.

Optional temporal smoothing (``smooth_window``, off by default as in Moore): a centred moving
average of each keypoint over the frames where it is present, applied to the driving keypoints
before alignment.
"""

from __future__ import annotations

import numpy as np

from anim_jax.pose.preprocess import KEYPOINT_THRESHOLD, NUM_WHOLEBODY

NECK = NUM_WHOLEBODY  # the virtual 134th point: the shoulders' mean
_L_HAND, _R_HAND = 91, 112
_HAND_BONES = tuple((0, 1 + 4 * f + i) if i == 0 else (4 * f + i, 4 * f + i + 1) for f in range(5) for i in range(4))

BODY_PARTS = ("neck", "shoulders", "torso_l", "torso_r", "upper_arm_l", "upper_arm_r", "lower_arm_l",
              "lower_arm_r", "upper_leg_l", "upper_leg_r", "lower_leg_l", "lower_leg_r")  # fmt: skip


def _bones() -> tuple[tuple[int, int, str], ...]:
    """(parent, child, part) in COCO-WholeBody indices (+ NECK), parents before children."""
    b = [(NECK, 5, "shoulders"), (NECK, 6, "shoulders"), (NECK, 0, "neck"), (NECK, 11, "torso_l"), (NECK, 12, "torso_r")]
    b += [(0, 1, "face"), (0, 2, "face"), (1, 3, "face"), (2, 4, "face")]
    b += [(0, j, "face") for j in range(23, 91)]
    b += [(5, 7, "upper_arm_l"), (7, 9, "lower_arm_l"), (6, 8, "upper_arm_r"), (8, 10, "lower_arm_r")]
    b += [(11, 13, "upper_leg_l"), (13, 15, "lower_leg_l"), (12, 14, "upper_leg_r"), (14, 16, "lower_leg_r")]
    b += [(15, j, "foot_l") for j in (17, 18, 19)] + [(16, j, "foot_r") for j in (20, 21, 22)]
    for wrist, root, side in ((9, _L_HAND, "l"), (10, _R_HAND, "r")):
        b.append((wrist, root, f"hand_{side}"))
        b += [(root + p, root + c, f"hand_{side}") for p, c in _HAND_BONES]
    return tuple(b)


BONES = _bones()
PARENT = {c: p for p, c, _ in BONES}
PART = {c: part for _, c, part in BONES}


def _mirror(part: str) -> str | None:
    if part.endswith("_l"):
        return part[:-1] + "r"
    if part.endswith("_r"):
        return part[:-1] + "l"
    return None


def with_neck(keypoints: np.ndarray, scores: np.ndarray, threshold: float = KEYPOINT_THRESHOLD):
    """(..., 134, 2) positions and (..., 134) presence, the neck appended at index 133."""
    kp = np.concatenate([keypoints, keypoints[..., [5, 6], :].mean(-2, keepdims=True)], -2)
    present = scores > threshold
    present = np.concatenate([present, present[..., 5:6] & present[..., 6:7]], -1)
    return kp, present


def part_scales(
    ref_kp: np.ndarray, ref_sc: np.ndarray, drv_kp: np.ndarray, drv_sc: np.ndarray, threshold: float = KEYPOINT_THRESHOLD
) -> tuple[dict[str, float], float]:
    """({part: factor}, global scale) from one reference pose and one driving pose ((133, 2), (133,))."""
    rk, rp = with_neck(np.asarray(ref_kp, np.float64), np.asarray(ref_sc), threshold)
    dk, dp = with_neck(np.asarray(drv_kp, np.float64), np.asarray(drv_sc), threshold)
    sums: dict[str, list[float]] = {}
    for p, c, part in BONES:
        if rp[p] and rp[c] and dp[p] and dp[c]:
            d = np.linalg.norm(dk[c] - dk[p])
            if d > 1e-6:
                s = sums.setdefault(part, [0.0, 0.0])
                s[0] += float(np.linalg.norm(rk[c] - rk[p]))
                s[1] += float(d)
    body = [sums[p] for p in BODY_PARTS if p in sums]
    if not body:
        raise ValueError("cannot align: no body bone is visible in both the reference and the driving frame")
    global_scale = sum(r for r, _ in body) / sum(d for _, d in body)
    factors = {}
    for part in dict.fromkeys(part for _, _, part in BONES):
        if part in sums:
            factors[part] = sums[part][0] / sums[part][1]
        elif _mirror(part) in sums:
            factors[part] = sums[_mirror(part)][0] / sums[_mirror(part)][1]
        else:
            factors[part] = global_scale
    return factors, global_scale


def smooth(keypoints: np.ndarray, scores: np.ndarray, window: int, threshold: float = KEYPOINT_THRESHOLD) -> np.ndarray:
    """Centred moving average over ``window`` frames (odd) of each keypoint where it is present.
    keypoints (F, K, 2), scores (F, K); absent points are left as they are."""
    if window <= 1:
        return keypoints
    if window % 2 == 0:
        raise ValueError(f"smooth_window must be odd, got {window}")
    present = (scores > threshold).astype(np.float64)
    kernel = np.ones(window)
    half = window // 2
    num = np.stack([np.apply_along_axis(lambda v: np.convolve(np.pad(v, half), kernel, "valid"), 0, keypoints[..., i] * present)
                    for i in range(2)], -1)  # fmt: skip
    den = np.apply_along_axis(lambda v: np.convolve(np.pad(v, half), kernel, "valid"), 0, present)[..., None]
    out = keypoints.copy()
    mask = present > 0
    out[mask] = (num / np.maximum(den, 1))[mask]
    return out


def align_keypoints(
    drv_kp: np.ndarray,
    drv_sc: np.ndarray,
    ref_kp: np.ndarray,
    ref_sc: np.ndarray,
    *,
    frame: int | None = None,
    smooth_window: int = 0,
    threshold: float = KEYPOINT_THRESHOLD,
) -> np.ndarray:
    """Aligned driving keypoints (F, 133, 2) in the reference image's pixels.

    drv_kp (F, 133, 2), drv_sc (F, 133): one person per frame; ref_kp (133, 2), ref_sc (133,).
    frame: the driving frame the part scales come from (default: the first with a neck).
    """
    drv_kp = np.asarray(drv_kp, np.float64)
    drv_sc = np.asarray(drv_sc)
    if drv_kp.ndim != 3 or drv_kp.shape[1:] != (NUM_WHOLEBODY, 2) or drv_sc.shape != drv_kp.shape[:2]:
        raise ValueError(f"driving keypoints must be (F, 133, 2) with scores (F, 133), got {drv_kp.shape}, {drv_sc.shape}")
    drv_kp = smooth(drv_kp, drv_sc, smooth_window, threshold)
    rk, rp = with_neck(np.asarray(ref_kp, np.float64), np.asarray(ref_sc), threshold)
    if not rp[NECK]:
        raise ValueError("cannot align: the reference pose has no neck (both shoulders must be visible)")
    dk, dp = with_neck(drv_kp, drv_sc, threshold)
    has_neck = np.flatnonzero(dp[:, NECK])
    if len(has_neck) == 0:
        raise ValueError("cannot align: no driving frame shows both shoulders (the neck)")
    if frame is None:
        frame = int(has_neck[0])
    if not 0 <= frame < len(dk):
        raise ValueError(f"frame {frame} is outside the {len(dk)} driving frames")
    factors, global_scale = part_scales(ref_kp, ref_sc, drv_kp[frame], drv_sc[frame], threshold)
    if not dp[frame, NECK]:
        raise ValueError(f"cannot align to driving frame {frame}: it has no neck")
    # The neck of frames without one: the nearest frame that has one.
    nearest = has_neck[np.abs(has_neck[None, :] - np.arange(len(dk))[:, None]).argmin(1)]
    neck = dk[nearest, NECK]
    out = np.empty_like(dk)
    out[:, NECK] = rk[NECK] + global_scale * (neck - dk[frame, NECK])
    anchor_pos = dk.copy()
    anchor_pos[:, NECK] = neck
    for t in range(len(dk)):
        for _, child, _ in BONES:
            a, fs = PARENT[child], [factors[PART[child]]]
            while a != NECK and not dp[t, a]:
                fs.append(factors[PART[a]])
                a = PARENT[a]
            out[t, child] = out[t, a] + float(np.mean(fs)) * (dk[t, child] - anchor_pos[t, a])
    return out[:, :NUM_WHOLEBODY]


def align_poses(driving, reference, *, frame: int | None = None, reference_frame: int = 0, smooth_window: int = 0):
    """``Poses`` of the driving video aligned to ``reference`` (``Poses`` of the reference image):
    in the reference image's pixels and sizes, so they render on the reference's canvas. Uses the
    first person of each frame; frames without a person stay empty."""
    from anim_jax.pose.extract import Poses

    if reference.num_persons[reference_frame] == 0:
        raise ValueError(f"cannot align: no person was found in the reference (frame {reference_frame})")
    ref_kp, ref_sc = reference.keypoints[reference_frame, 0], reference.scores[reference_frame, 0]
    found = np.flatnonzero(driving.num_persons > 0)
    if len(found) == 0:
        raise ValueError("cannot align: no person was found in any driving frame")
    if frame is not None:
        if frame not in set(found.tolist()):
            raise ValueError(f"driving frame {frame} has no person")
        frame = int(np.flatnonzero(found == frame)[0])
    aligned = align_keypoints(driving.keypoints[found, 0], driving.scores[found, 0], ref_kp, ref_sc,
                              frame=frame, smooth_window=smooth_window)  # fmt: skip
    kp = np.zeros((len(driving), 1, NUM_WHOLEBODY, 2))
    sc = np.zeros((len(driving), 1, NUM_WHOLEBODY), np.float32)
    kp[found, 0] = aligned
    sc[found, 0] = driving.scores[found, 0]
    return Poses(kp, sc, (driving.num_persons > 0).astype(np.int32), tuple(reference.image_size),
                 tuple(reference.detect_size), driving.fps)  # fmt: skip
