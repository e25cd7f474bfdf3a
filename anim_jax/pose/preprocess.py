"""DWPose's host-side pre- and post-processing, number for number as Moore-AnimateAnyone runs it.

Moore (``src/dwpose``) feeds two ONNX networks from numpy/OpenCV code; the rendered skeletons its
models were trained on depend on every rounding in that code, so this module reproduces it to the
bit (tested against the original's outputs, ``tests/data/dwpose_moore``), dtypes included:

* ``detection_size`` / ``resize_for_detection``: the input resize (shorter side to 512, both sides
  rounded to multiples of 64, Lanczos when enlarging, area when shrinking);
* ``letterbox``: the detector's 640x640 input (top-left aligned, bilinear, pad value 114);
* ``decode_detections``: YOLOX grid decode (strides 8/16/32), NMS (IoU 0.45 over scores > 0.1) and
  the person filter (class 0, score > 0.3);
* ``crop_transforms`` / ``crop_person``: the affine crop of a padded (x1.25) box, widened to the
  network's aspect ratio as mmpose does;
* ``keypoints_from_simcc``: SimCC maxima (split ratio 2) back to image pixels;
* ``moore_layout`` / ``select_person``: the neck, the OpenPose-18 body order, and Moore's rule for
  picking one person.

Colour order: Moore converts frames RGB -> BGR before the networks, so both networks see BGR; the
extractor flips channels on the device. Everything here is channel-order agnostic.

Why on the host: NMS keeps a data-dependent number of boxes in a sequential loop over a few dozen
candidates (microseconds in numpy; on a device it needs padded fixed-size loops), and the crop must
match OpenCV's fixed-point bilinear warp bit for bit, which a gather-based device resampler does
not. Both are small next to the networks (see NOTES / benchmarks for the measured split).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

DETECT_RESOLUTION = 512  # Moore's DWposeDetector(detect_resolution=512)
DETECTOR_INPUT = (640, 640)  # (h, w)
PAD_VALUE = 114
STRIDES = (8, 16, 32)
NMS_IOU = 0.45
SCORE_THRESHOLD = 0.1
PERSON_THRESHOLD = 0.3
BBOX_PADDING = 1.25
POSE_INPUT = (384, 288)  # (h, w) of dw-ll_ucoco_384
# Applied to BGR pixels (the numbers are ImageNet's RGB statistics; DWPose applies them to BGR).
POSE_MEAN = (123.675, 116.28, 103.53)
POSE_STD = (58.395, 57.12, 57.375)
SIMCC_SPLIT_RATIO = 2.0
KEYPOINT_THRESHOLD = 0.3  # Moore: a body joint is drawn when its score > 0.3; hands/face when >= 0.3

NUM_WHOLEBODY = 133  # COCO-WholeBody: 17 body, 6 feet, 68 face, 21 + 21 hands
# COCO-17 (after the inserted neck at 17) -> OpenPose-18 positions, as DWPose's Wholebody remaps.
_MMPOSE_IDX = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
_OPENPOSE_IDX = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]


# ----------------------------------------------------------------------------------------------
# Detector input


def detection_size(height: int, width: int, resolution: int = DETECT_RESOLUTION) -> tuple[int, int]:
    """(h, w) of Moore's ``resize_image``: shorter side to ``resolution``, sides rounded to multiples of 64."""
    h, w = float(height), float(width)
    k = float(resolution) / min(h, w)
    h *= k
    w *= k
    out = int(np.round(h / 64.0)) * 64, int(np.round(w / 64.0)) * 64
    if min(out) <= 0:
        raise ValueError(f"a {height}x{width} frame at detection resolution {resolution} rounds to {out[0]}x{out[1]}")
    return out


def resize_for_detection(frame: np.ndarray, resolution: int | None = DETECT_RESOLUTION) -> np.ndarray:
    """The frame at the detection size (unchanged when ``resolution`` is None)."""
    if resolution is None:
        return frame
    h, w = detection_size(frame.shape[0], frame.shape[1], resolution)
    k = float(resolution) / min(float(frame.shape[0]), float(frame.shape[1]))
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def letterbox(image: np.ndarray, size: tuple[int, int] = DETECTOR_INPUT) -> tuple[np.ndarray, float]:
    """(size[0], size[1], 3) uint8: the image scaled to fit at the top left, the rest ``PAD_VALUE``; and the scale."""
    out = np.full((size[0], size[1], 3), PAD_VALUE, dtype=np.uint8)
    r = min(size[0] / image.shape[0], size[1] / image.shape[1])
    h, w = int(image.shape[0] * r), int(image.shape[1] * r)
    out[:h, :w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    return out, r


# ----------------------------------------------------------------------------------------------
# Detector output


@functools.lru_cache(maxsize=8)
def _grid(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in STRIDES:
        xv, yv = np.meshgrid(np.arange(size[1] // s), np.arange(size[0] // s))
        g = np.stack((xv, yv), 2).reshape(-1, 2)
        grids.append(g)
        strides.append(np.full((g.shape[0], 1), s))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    grids.flags.writeable = strides.flags.writeable = False  # shared between calls
    return grids, strides


def num_anchors(size: tuple[int, int] = DETECTOR_INPUT) -> int:
    return sum((size[0] // s) * (size[1] // s) for s in STRIDES)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    # Greedy NMS with DWPose's "+1" pixel areas; hand-written because its exact arithmetic (float32,
    # +1 areas, unstable argsort order) decides which boxes survive, and no library reproduces it.
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= iou)[0] + 1]
    return keep


def decode_detections(raw: np.ndarray, ratio: float, size: tuple[int, int] = DETECTOR_INPUT) -> np.ndarray:
    """Person boxes (n, 4) float64 x1, y1, x2, y2 in the detection image, best first.

    ``raw``: (A, 5 + C) float32 for one image (box offsets, objectness, class scores), or just its
    first 6 columns: only class 0 (person) survives DWPose's filter and NMS runs per class, so the
    other classes never change the result.
    """
    raw = np.array(raw[:, :6], dtype=np.float32)
    grids, strides = _grid(tuple(size))
    if raw.shape[0] != grids.shape[0]:
        raise ValueError(f"detector output has {raw.shape[0]} anchors; a {size[0]}x{size[1]} input has {grids.shape[0]}")
    raw[:, :2] = (raw[:, :2] + grids) * strides
    raw[:, 2:4] = np.exp(raw[:, 2:4]) * strides
    boxes = np.ones_like(raw[:, :4])
    boxes[:, 0] = raw[:, 0] - raw[:, 2] / 2.0
    boxes[:, 1] = raw[:, 1] - raw[:, 3] / 2.0
    boxes[:, 2] = raw[:, 0] + raw[:, 2] / 2.0
    boxes[:, 3] = raw[:, 1] + raw[:, 3] / 2.0
    boxes /= ratio
    scores = raw[:, 4] * raw[:, 5]
    valid = scores > SCORE_THRESHOLD
    if not valid.any():
        return np.zeros((0, 4))
    boxes, scores = boxes[valid], scores[valid]
    keep = _nms(boxes, scores, NMS_IOU)
    # DWPose compares the kept scores after they were widened to float64.
    person = scores[keep].astype(np.float64) > PERSON_THRESHOLD
    return boxes[keep][person].astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Pose network input


def crop_transforms(boxes: np.ndarray, input_size: tuple[int, int] = POSE_INPUT) -> tuple[np.ndarray, np.ndarray]:
    """(center (n, 2), scale (n, 2)) float64 of each box: padded by 1.25 and widened to the input's w/h."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    center = np.stack([boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]], 1) * 0.5
    scale = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1) * BBOX_PADDING
    aspect = input_size[1] / input_size[0]
    w, h = scale[:, :1], scale[:, 1:]
    scale = np.where(w > h * aspect, np.hstack([w, w / aspect]), np.hstack([h * aspect, h]))
    return center, scale


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.r_[-d[1], d[0]]


def warp_matrix(center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int] = POSE_INPUT) -> np.ndarray:
    """2x3 float64 affine matrix mapping the box (center, scale) onto the (h, w) input (no rotation)."""
    dst_h, dst_w = input_size
    # float32 corner points, as mmpose's get_warp_matrix builds them; the matrix depends on that rounding.
    src = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center
    src[1, :] = center + np.array([0.0, scale[0] * -0.5])
    src[2, :] = _third_point(src[0, :], src[1, :])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + np.array([0.0, dst_w * -0.5])
    dst[2, :] = _third_point(dst[0, :], dst[1, :])
    return cv2.getAffineTransform(src, dst)


def crop_person(image: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: tuple[int, int] = POSE_INPUT) -> np.ndarray:
    """(h, w, 3) uint8 crop of one person (bilinear, black outside the image)."""
    m = warp_matrix(center, scale, input_size)
    return cv2.warpAffine(image, m, (int(input_size[1]), int(input_size[0])), flags=cv2.INTER_LINEAR)


def normalize_crops(crops_bgr: np.ndarray) -> np.ndarray:
    """float64 (x - mean) / std of BGR crops, exactly as DWPose computes the network input (numpy reference)."""
    return (crops_bgr - np.array(POSE_MEAN)) / np.array(POSE_STD)


# ----------------------------------------------------------------------------------------------
# Pose network output


def simcc_maximum(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax x, argmax y) (N, K, 2) float32 and value min(max x, max y) (N, K), the numpy reference
    of what the extractor computes on the device."""
    locs = np.stack([simcc_x.argmax(-1), simcc_y.argmax(-1)], -1).astype(np.float32)
    return locs, np.minimum(simcc_x.max(-1), simcc_y.max(-1))


def keypoints_from_simcc(
    locs: np.ndarray,
    vals: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    input_size: tuple[int, int] = POSE_INPUT,
) -> tuple[np.ndarray, np.ndarray]:
    """SimCC maxima -> (keypoints (N, K, 2) float64 image pixels, scores (N, K) float32).

    ``locs``/``vals`` as ``simcc_maximum`` returns them; a non-positive score marks the location -1
    before the split-ratio division, as DWPose does.
    """
    locs = np.array(locs, dtype=np.float32)
    vals = np.asarray(vals, dtype=np.float32)
    locs[vals <= 0.0] = -1
    kp = locs / SIMCC_SPLIT_RATIO
    size = np.array((input_size[1], input_size[0]))
    center = np.asarray(center, np.float64)[:, None, :]
    scale = np.asarray(scale, np.float64)[:, None, :]
    return kp / size * scale + center - scale / 2, vals


# ----------------------------------------------------------------------------------------------
# Persons


def moore_layout(keypoints: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO-WholeBody (P, 133) -> Moore's (P, 134) layout: OpenPose-18 body (with the neck), 6 feet,
    68 face, 21 + 21 hands. The neck is the shoulders' mean; its score is 1 when both shoulders
    score > 0.3, else 0 (DWPose's convention). float64 throughout, as DWPose."""
    info = np.concatenate((np.asarray(keypoints, np.float64), np.asarray(scores)[..., None]), axis=-1).astype(np.float64)
    neck = np.mean(info[:, [5, 6]], axis=1)
    neck[:, 2:4] = np.logical_and(info[:, 5, 2:4] > KEYPOINT_THRESHOLD, info[:, 6, 2:4] > KEYPOINT_THRESHOLD).astype(int)
    info = np.insert(info, 17, neck, axis=1)
    info[:, _OPENPOSE_IDX] = info[:, _MMPOSE_IDX]
    return info[..., :2], info[..., 2]


def select_person(keypoints: np.ndarray, scores: np.ndarray) -> int:
    """Moore's choice among P >= 1 persons: the highest mean OpenPose-18 body score (neck included), first on ties."""
    _, s = moore_layout(keypoints, scores)
    return int(np.mean(s[:, :18], axis=-1).argmax(axis=0))


def full_image_box(height: int, width: int) -> np.ndarray:
    """DWPose's fallback box when the detector finds nobody: the whole image."""
    return np.array([[0, 0, width, height]], dtype=np.float64)


def check_frame(frame, name: str = "frame") -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 RGB image, got {arr.shape} {arr.dtype}")
    if min(arr.shape[:2]) < 1:
        raise ValueError(f"{name}: empty image {arr.shape}")
    return arr


def ceil_to(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)
