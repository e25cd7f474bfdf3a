"""Deterministic stand-ins for DWPose's two networks, shared by the pose tests.

The pre/post-processing parity test (``test_pose_preprocess.py``) runs the whole extractor with
these instead of real networks, and the reference arrays under ``tests/data/dwpose_moore`` were
produced by Moore-AnimateAnyone's own ``src/dwpose`` code fed by the same stand-ins (its ONNX
sessions replaced by objects calling these functions). Outputs depend only on the network *input*
(a SHA-256 of its pixels), so a crop or letterbox that differs by one pixel value gives entirely
different keypoints and the test fails loudly. Pure numpy + hashlib (SHAKE-256 streams): identical across numpy versions.
"""

from __future__ import annotations

import hashlib

import numpy as np

NUM_CLASSES = 80
NUM_KEYPOINTS = 133


def digest(image_bgr: np.ndarray) -> str:
    """SHA-256 of a uint8 BGR (H, W, 3) network input."""
    return hashlib.sha256(np.ascontiguousarray(image_bgr, dtype=np.uint8).tobytes()).hexdigest()


def detector_raw(plants: np.ndarray, num_anchors: int = 8400) -> np.ndarray:
    """(A, 5 + 80) float32 raw YOLOX output: quiet everywhere (scores 0.025) except the planted rows.

    plants: (n, 8) rows ``anchor, dx, dy, log_w, log_h, objectness, class, class_score``.
    """
    raw = np.zeros((num_anchors, 5 + NUM_CLASSES), np.float32)
    raw[:, 0:2] = 0.25
    raw[:, 2:4] = 1.0
    raw[:, 4] = 0.05
    raw[:, 5:] = 0.5
    for anchor, dx, dy, lw, lh, obj, cls, cls_score in plants:
        a = int(anchor)
        raw[a, :5] = (dx, dy, lw, lh, obj)
        raw[a, 5:] = 0.05  # confident about this one class only
        raw[a, 5 + int(cls)] = cls_score
    return raw


def _stream(seed: bytes, n: int) -> np.ndarray:
    return np.frombuffer(hashlib.shake_256(seed).digest(n), np.uint8)


def fake_simcc(crop_bgr: np.ndarray, wx: int = 576, wy: int = 768) -> tuple[np.ndarray, np.ndarray]:
    """((K, wx), (K, wy)) float32 SimCC logits with one peak per keypoint, drawn from the crop's hash.

    Peak values are multiples of 0.005 in [-0.2, 1.075]: some non-positive (DWPose marks those -1),
    some exactly 0.3 (the visibility threshold), so the edge cases are exercised.
    """
    b = _stream(bytes.fromhex(digest(crop_bgr)), NUM_KEYPOINTS * 8).reshape(NUM_KEYPOINTS, 8).astype(np.int64)
    lx = (b[:, 0] * 256 + b[:, 1]) % wx
    ly = (b[:, 2] * 256 + b[:, 3]) % wy
    vx = ((b[:, 4] - 40) / 200.0).astype(np.float32)
    vy = ((b[:, 5] - 40) / 200.0).astype(np.float32)
    # Half the keypoints share one peak value on both axes, so min(max x, max y) ties happen too.
    vy = np.where(b[:, 6] % 2 == 0, vx, vy)
    sx = np.full((NUM_KEYPOINTS, wx), -1.0, np.float32)
    sy = np.full((NUM_KEYPOINTS, wy), -1.0, np.float32)
    sx[np.arange(NUM_KEYPOINTS), lx] = vx
    sy[np.arange(NUM_KEYPOINTS), ly] = vy
    return sx, sy


class FakeNetworks:
    """The extractor's network interface (``DeviceNetworks``) over the stand-ins: numpy in, numpy out."""

    def __init__(self, plants_by_digest: dict[str, np.ndarray], batch_size: int = 4, pose_input=(384, 288)):
        self.plants = plants_by_digest
        self.batch_size = batch_size
        self.pose_input = pose_input
        self.seen: list[str] = []

    def detect(self, images: np.ndarray) -> np.ndarray:
        out = []
        for im in images:
            d = digest(im[..., ::-1])
            self.seen.append(d)
            plants = self.plants.get(d, np.zeros((0, 8)))
            out.append(detector_raw(plants)[:, :6])
        return np.stack(out)

    def estimate(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from anim_jax.pose.preprocess import simcc_maximum

        h, w = self.pose_input
        sims = [fake_simcc(c[..., ::-1], 2 * w, 2 * h) for c in crops]
        return simcc_maximum(np.stack([s[0] for s in sims]), np.stack([s[1] for s in sims]))


def uniform(seed: str, shape) -> np.ndarray:
    """float64 in [0, 1) from a SHA-256 stream of ``seed``: the same numbers under any numpy version."""
    n = int(np.prod(shape))
    words = _stream(seed.encode(), 4 * n).view("<u4")
    return (words / 2.0**32).reshape(shape)


def synthetic_frame(height: int, width: int, seed: str) -> np.ndarray:
    """(H, W, 3) uint8: colour ramps and six flat rectangles placed by ``seed``."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) * 127 / (height + width)], -1)
    img = img.astype(np.uint8)
    u = uniform(seed, (6, 7))
    for r in u:
        x0, y0 = int(r[0] * width), int(r[1] * height)
        x1, y1 = x0 + 5 + int(r[2] * width / 2), y0 + 5 + int(r[3] * height / 2)
        img[y0:y1, x0:x1] = (r[4:7] * 256).astype(np.uint8)
    return img


def decode_case(seed: str) -> np.ndarray:
    """(8400, 85) float32 raw detector output with ~60 confident anchors, no exact score ties."""
    raw = (uniform(seed + "/raw", (8400, 85)) * 4 - 2).astype(np.float32)
    raw[:, 4:] = (uniform(seed + "/scores", (8400, 81)) * 0.3).astype(np.float32)
    hot = (uniform(seed + "/hot", (60,)) * 8400).astype(np.int64)
    raw[hot, 4] = (0.3 + 0.7 * uniform(seed + "/obj", (60,))).astype(np.float32)
    raw[hot, 5] = (0.2 + 0.8 * uniform(seed + "/cls", (60,))).astype(np.float32)
    return raw


def simcc_case(seed: str, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """((n, 133, 576), (n, 133, 768)) float32 logits in [-2, 2); the first 10 keypoints all negative."""
    sx = (uniform(seed + "/x", (n, 133, 576)) * 4 - 2).astype(np.float32)
    sy = (uniform(seed + "/y", (n, 133, 768)) * 4 - 2).astype(np.float32)
    sx[:, :10] -= 5
    return sx, sy


def draw_case(seed: str) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """((H, W), keypoints (P, 133, 2) float64 pixels, scores (P, 133) float32) for the drawing test:
    points up to 10 % outside the canvas, every 5th case on whole pixels, scores at and around 0.3."""
    u = uniform(seed + "/size", (3,))
    sizes = (64, 128, 192, 256)
    h, w, p = sizes[int(u[0] * 4)], sizes[int(u[1] * 4)], 1 + int(u[2] * 3)
    kp = (uniform(seed + "/kp", (p, 133, 2)) * 1.2 - 0.1) * (w, h)
    if seed.endswith(("0", "5")):
        kp = np.round(kp)
    levels = np.array([0.0, 0.1, 0.29, 0.3, 0.31, 0.5, 0.9, 1.0], np.float32)
    sc = levels[(uniform(seed + "/sc", (p, 133)) * 8).astype(int)]
    sc[:, :17] = uniform(seed + "/body", (p, 17)).astype(np.float32)
    if seed.endswith(("0", "7")):
        sc[:, 5:7] = 0.9  # both shoulders: the neck is drawn
    return (h, w), kp, sc


def _random_network(build, seed):
    """A network with uniform random parameters drawn in numpy (eager jax.random initialisation
    compiles one program per parameter shape, seconds for nothing here)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    module = nnx.eval_shape(build)
    rng = np.random.default_rng(seed)
    params = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda v: jnp.asarray(rng.uniform(-0.3, 0.3, v.shape), jnp.float32), params))
    return module


def tiny_dwpose(out, *, confident_keypoints: bool = False):
    """Writes tiny random DWPose networks to ``out`` (a converted directory) and returns it. The
    detector is confident at the stride-32 anchors, so every frame has several persons and the pose
    network runs. ``confident_keypoints``: SimCC logits scaled up so every keypoint's score (the
    maximum of hundreds of random logits) is far above 0.3: every joint is visible (alignment needs
    a neck)."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from anim_jax.pose.networks import save_dwpose
    from anim_jax.pose.rtmpose import RTMPose, RTMPoseConfig
    from anim_jax.pose.yolox import YOLOX, YOLOXConfig

    detector = _random_network(lambda: YOLOX(YOLOXConfig.tiny(), rngs=nnx.Rngs(0)), 0)
    for i, level in enumerate(detector.head.levels):
        for pred in (level.obj_pred, level.cls_pred, level.reg_pred):
            pred.kernel[...] = pred.kernel[...] * 0.05  # near-constant outputs, set by the biases
        # Only the stride-32 level is confident; its boxes are large, so NMS leaves a few per frame.
        level.obj_pred.bias[...] = jnp.full((1,), 3.0 if i == 2 else -8.0)
        level.cls_pred.bias[...] = jnp.array([3.0, -3.0, -3.0])
        level.reg_pred.bias[...] = jnp.array([0.5, 0.5, 1.5, 2.0])
    pose = _random_network(lambda: RTMPose(dataclasses.replace(RTMPoseConfig.tiny(), num_keypoints=133), rngs=nnx.Rngs(1)), 1)
    if confident_keypoints:
        for cls in (pose.head.cls_x, pose.head.cls_y):
            cls.kernel[...] = cls.kernel[...] * 100.0
    save_dwpose(out, detector, pose)
    return out
