"""Skeleton images as Moore-AnimateAnyone draws them (``src/dwpose``: ``draw_pose`` and ``util.draw_*``).

The Moore and MusePose networks were trained on exactly these pictures, so they are reproduced pixel
for pixel with OpenCV's own rasteriser (``tests/test_pose_render.py`` compares against images the
original code produced): body limbs as filled ellipses (stick width 4) in the 18 OpenPose colours,
the canvas darkened to 60 %, the 18 joints as radius-4 discs; hands as 20 rainbow edges (thickness 2)
with blue radius-4 dots; the face as 68 white radius-3 dots; feet are not drawn.

Visibility follows Moore: a body joint is drawn when its score is > 0.3 (a limb when both ends
are); a hand or face point when its score is >= 0.3 and it lands at pixel column and row >= 1 (the
original's ``x > eps`` test on the truncated pixel position).

Coordinates go through Moore's normalisation (divide by the size of the image the keypoints are
in, multiply by the canvas size, truncate), so drawing the keypoints of a 1080x1920 frame on a
512x896 canvas is what Moore draws after detecting at that size. Images are RGB uint8.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from anim_jax.pose.preprocess import KEYPOINT_THRESHOLD, moore_layout

STICKWIDTH = 4
# 1-based OpenPose-18 joint pairs; Moore draws the first 17 (the two ear-shoulder pairs are skipped).
LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
HAND_EDGES = tuple((0, 1 + 4 * f + i) if i == 0 else (4 * f + i, 4 * f + i + 1) for f in range(5) for i in range(4))
# Float colours, as OpenCV receives them from the original (it rounds them itself).
HAND_COLORS = tuple(tuple(c * 255 for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)) for i in range(len(HAND_EDGES)))
_EPS = 0.01

BODY = slice(0, 18)  # in Moore's 134-point layout
FACE = slice(24, 92)
LEFT_HAND = slice(92, 113)
RIGHT_HAND = slice(113, 134)


def draw_body(canvas: np.ndarray, body: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Draws (P, 18, 2) normalised OpenPose-18 bodies; returns the (darkened) canvas."""
    h, w = canvas.shape[:2]
    for i, limb in enumerate(LIMBS):
        a, b = limb[0] - 1, limb[1] - 1
        for n in range(len(body)):
            if not (visible[n, a] and visible[n, b]):
                continue
            xs = body[n, [a, b], 0] * float(w)
            ys = body[n, [a, b], 1] * float(h)
            my, mx = np.mean(ys), np.mean(xs)
            length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), STICKWIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        for n in range(len(body)):
            if not visible[n, i]:
                continue
            x, y = body[n, i]
            cv2.circle(canvas, (int(x * w), int(y * h)), 4, COLORS[i], thickness=-1)
    return canvas


def draw_hands(canvas: np.ndarray, hands: np.ndarray) -> np.ndarray:
    """Draws (N, 21, 2) normalised hands (hidden points already at -1)."""
    h, w = canvas.shape[:2]
    for peaks in hands:
        for ie, (a, b) in enumerate(HAND_EDGES):
            x1, y1 = int(peaks[a, 0] * w), int(peaks[a, 1] * h)
            x2, y2 = int(peaks[b, 0] * w), int(peaks[b, 1] * h)
            if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
                cv2.line(canvas, (x1, y1), (x2, y2), HAND_COLORS[ie], thickness=2)
        for x, y in peaks:
            x, y = int(x * w), int(y * h)
            if x > _EPS and y > _EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def draw_face(canvas: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Draws (N, 68, 2) normalised face landmarks (hidden points already at -1)."""
    h, w = canvas.shape[:2]
    for lmks in faces:
        for x, y in lmks:
            x, y = int(x * w), int(y * h)
            if x > _EPS and y > _EPS:
                cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)
    return canvas


def render_pose(
    keypoints: np.ndarray,
    scores: np.ndarray,
    image_size: tuple[int, int],
    canvas_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The skeleton image (H, W, 3) uint8 RGB of one frame.

    keypoints: (P, 133, 2) COCO-WholeBody pixel positions (x, y) in an image of ``image_size`` (h, w);
      P may be 0 (a black canvas).
    scores: (P, 133).
    canvas_size: (H, W) of the picture; default ``image_size``. Moore's convention is the detection
      size (``Poses.detect_size``); the source size keeps the video's resolution.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores)
    if keypoints.ndim == 2:
        keypoints, scores = keypoints[None], scores[None]
    if keypoints.shape[1:] != (133, 2) or scores.shape != keypoints.shape[:2]:
        raise ValueError(f"expected keypoints (P, 133, 2) and scores (P, 133), got {keypoints.shape} and {scores.shape}")
    h, w = canvas_size or image_size
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    if len(keypoints) == 0:
        return canvas
    points, score = moore_layout(keypoints, scores)
    points = points.copy()
    points[..., 0] /= float(image_size[1])
    points[..., 1] /= float(image_size[0])
    body = points[:, BODY].copy()
    # Moore's two thresholds differ on purpose-free detail: body "> 0.3", hands and face "not < 0.3".
    body_visible = score[:, BODY] > KEYPOINT_THRESHOLD
    points[score < KEYPOINT_THRESHOLD] = -1
    canvas = draw_body(canvas, body, body_visible)
    canvas = draw_hands(canvas, np.concatenate([points[:, LEFT_HAND], points[:, RIGHT_HAND]]))
    return draw_face(canvas, points[:, FACE])
