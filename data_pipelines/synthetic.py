"""Procedural synthetic training data: characters moving through articulated poses, with
OpenPose-18 skeleton renderings of the same poses.

Each video is one character with its own proportions (height, head size, shoulder and hip width, limb
lengths and thicknesses), colours (skin, hair, top, bottom, shoes, background), textures (stripes,
checks, dots or plain on the top and the bottom; a skirt sometimes) and motion (every joint angle a sum
of two slow sinusoids with its own frequencies and phases, plus a drift and bob of the whole body), so
consecutive frames change smoothly. The pose video draws the same 18 keypoints the way DWPose /
OpenPose does: 17 limbs as filled ellipses in the 18 OpenPose colours, the canvas times 0.6, then
the joints as filled circles (research/moore.md section 4.4). Everything is a pure function of
``(seed, video index)``.

Outputs, both usable by the rest of the package:
* ``write_synthetic_videos(root, n)``: ``root/char_00000.mp4`` + ``root_dwpose/char_00000.mp4`` (the
  ``anim-jax prepare`` input layout);
* ``write_synthetic_dataset(path, n)``: the prepared dataset directly, without video files.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from anim_jax import storage
from data_pipelines.video_io import encode_jpeg, encode_png, write_video

# OpenPose-18 keypoints: 0 nose, 1 neck, 2 r-shoulder, 3 r-elbow, 4 r-wrist, 5 l-shoulder, 6 l-elbow,
# 7 l-wrist, 8 r-hip, 9 r-knee, 10 r-ankle, 11 l-hip, 12 l-knee, 13 l-ankle, 14 r-eye, 15 l-eye,
# 16 r-ear, 17 l-ear. The character faces the camera, so its right side is on the image's left.
LIMBS = (  # OpenPose limbSeq, 0-based; DWPose draws the first 17
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
    (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip



# Background kinds; the default draw leaves out "plain" (the demo uses it alone: anim_jax/recipes/demo.py).
BACKGROUNDS = ("vgradient", "hgradient", "floor", "checks", "plain")
DEFAULT_BACKGROUNDS = BACKGROUNDS[:4]

# The demo's palette mode (``palette="train"`` / ``"heldout"``): tops and bottoms in clearly different
# named colours, so keeping the reference's look is something a small model can learn and a metric can
# check. A (top, bottom) colour pair is either a training pair or a held-out pair (``heldout_pair``),
# so held-out characters wear combinations no training video shows.
PALETTE = (
    ("red", (220, 40, 40)), ("orange", (245, 140, 25)), ("yellow", (240, 215, 40)), ("green", (40, 165, 60)),
    ("cyan", (35, 190, 215)), ("blue", (45, 70, 215)), ("purple", (135, 55, 200)), ("pink", (240, 115, 180)),
    ("white", (240, 240, 240)), ("black", (35, 35, 35)),
)  # fmt: skip
PALETTE_MODES = ("train", "heldout")

# Body-part labels of ``render_character(..., with_parts=True)`` (for per-part colour errors).
PARTS = ("background", "skin", "hair", "top", "bottom", "shoes")
PART_INDEX = {name: i for i, name in enumerate(PARTS)}


def heldout_pair(top: int, bottom: int) -> bool:
    """Whether the (top, bottom) palette pair is reserved for held-out characters (about one in
    seven pairs; every colour still appears as a top and as a bottom in training)."""
    return (3 * top + bottom) % 7 == 0


def check_backgrounds(backgrounds) -> tuple[str, ...] | None:
    """``backgrounds`` as a validated tuple of kinds; None stays None (the default draw)."""
    if backgrounds is None:
        return None
    out = tuple(backgrounds)
    bad = [b for b in out if b not in BACKGROUNDS]
    if not out or bad:
        raise ValueError(f"backgrounds must be a non-empty subset of {BACKGROUNDS}, got {list(out)}")
    return out


def _supersample(height: int, width: int) -> int:
    """Render at up to 4x and downsample: smooth edges and sub-pixel motion at 64x64, cheap at 512."""
    return max(1, min(4, 512 // max(height, width)))


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), int(index), 0x5EED))


def _color(rng, lo=0, hi=255) -> tuple[int, int, int]:
    return tuple(int(x) for x in rng.integers(lo, hi + 1, 3))


def make_character(rng: np.random.Generator, backgrounds=None, palette: str | None = None) -> dict:
    """Random proportions, colours, textures and motion parameters (lengths in units of body height);
    the background kind is drawn from ``backgrounds`` (None: ``DEFAULT_BACKGROUNDS``). ``palette``
    ("train" or "heldout"): clothes from ``PALETTE`` instead (see ``apply_palette``)."""
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731
    skin_tones = np.array([[255, 224, 196], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36], [92, 56, 30]])
    skin = np.clip(skin_tones[rng.integers(len(skin_tones))] + rng.integers(-15, 16, 3), 0, 255)
    head = u(0.055, 0.075)
    leg = u(0.21, 0.26)
    char = {
        "height": u(0.62, 0.82),  # body height / image height
        "head_r": head,
        "neck": u(0.03, 0.05),
        "torso": u(0.26, 0.32),
        "shoulder": u(0.09, 0.14),  # half width
        "hip": u(0.05, 0.09),
        "upper_arm": u(0.13, 0.17),
        "forearm": u(0.12, 0.16),
        "thigh": leg,
        "shin": leg * u(0.9, 1.1),
        "limb_w": u(0.05, 0.08),
        "leg_w": u(0.06, 0.09),
        "skin": tuple(int(x) for x in skin),
        "hair": _color(rng, 0, 160),
        "top": _color(rng, 30, 255),
        "top2": _color(rng, 0, 255),
        "bottom": _color(rng, 0, 200),
        "bottom2": _color(rng, 0, 255),
        "shoes": _color(rng, 0, 120),
        "bg": _color(rng, 60, 255),
        "bg2": _color(rng, 60, 255),
        "top_pattern": str(rng.choice(["plain", "hstripes", "vstripes", "checks", "dots"])),
        "bottom_pattern": str(rng.choice(["plain", "plain", "vstripes", "checks"])),
        "bg_pattern": str(rng.choice(list(DEFAULT_BACKGROUNDS))),
        "pattern_period": u(0.04, 0.09),
        "skirt": bool(rng.random() < 0.3),
        "x": u(0.4, 0.6),  # hip-centre position (fraction of width)
    }
    # motion: name -> (mean, [(amplitude, angular frequency per frame, phase), x2]) in radians
    speed = u(0.75, 1.25)

    def wave(mean, amp):  # periods of 20-60 frames
        return (mean, [(amp * u(0.4, 1.0), speed * u(2 * math.pi / 60, 2 * math.pi / 20), u(0, 2 * math.pi)) for _ in range(2)])

    char["motion"] = {
        "lean": wave(0.0, 0.12),
        "head_tilt": wave(0.0, 0.2),
        "r_arm": wave(u(0.3, 0.9), 0.7),
        "l_arm": wave(u(0.3, 0.9), 0.7),
        "r_elbow": wave(u(0.3, 0.9), 0.6),
        "l_elbow": wave(u(0.3, 0.9), 0.6),
        "r_leg": wave(u(0.05, 0.2), 0.25),
        "l_leg": wave(u(0.05, 0.2), 0.25),
        "r_knee": wave(0.25, 0.3),
        "l_knee": wave(0.25, 0.3),
        "drift": wave(0.0, 0.08),
        "bob": wave(0.0, 0.02),
    }
    if backgrounds is not None:
        # drawn last, so everything else about the character is the default draw's
        char["bg_pattern"] = str(rng.choice(list(check_backgrounds(backgrounds))))
    if palette is not None:
        apply_palette(char, rng, palette)
    return char


def apply_palette(char: dict, rng: np.random.Generator, mode: str) -> None:
    """Clothes in two different ``PALETTE`` colours (a training or a held-out pair, by ``mode``),
    patterns in a darker shade of the same colour (the part keeps its colour on average), dark
    shoes, natural hair, a light grey background. Drawn after everything else, so proportions and
    motion are the default draw's."""
    if mode not in PALETTE_MODES:
        raise ValueError(f"palette must be one of {PALETTE_MODES} or None, got {mode!r}")
    n = len(PALETTE)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b and heldout_pair(a, b) == (mode == "heldout")]
    top, bottom = pairs[int(rng.integers(len(pairs)))]
    shade = lambda c, f: tuple(int(round(x * f)) for x in c)  # noqa: E731
    char["top"], char["bottom"] = PALETTE[top][1], PALETTE[bottom][1]
    char["top2"], char["bottom2"] = shade(char["top"], 0.6), shade(char["bottom"], 0.6)
    char["palette"] = (PALETTE[top][0], PALETTE[bottom][0])
    char["top_pattern"] = str(rng.choice(["plain", "hstripes", "vstripes"]))
    char["bottom_pattern"] = str(rng.choice(["plain", "vstripes"]))
    char["pattern_period"] = float(rng.uniform(0.06, 0.1))
    char["hair"] = ((25, 20, 15), (95, 60, 30), (205, 170, 90), (150, 50, 25))[int(rng.integers(4))]
    char["shoes"] = ((20, 20, 20), (70, 45, 30), (60, 60, 70))[int(rng.integers(3))]
    grey = int(rng.integers(190, 231))
    char["bg"] = tuple(int(np.clip(grey + d, 0, 255)) for d in rng.integers(-8, 9, 3))
    char["bg2"] = char["bg"]
    char["bg_pattern"] = "plain"
    char["skirt"] = False


def _angle(spec, t: float) -> float:
    mean, waves = spec
    return mean + sum(a * math.sin(w * t + p) for a, w, p in waves)


def keypoints(char: dict, t: float, height: int, width: int) -> np.ndarray:
    """(18, 2) float (x, y) pixel coordinates of the OpenPose keypoints at frame ``t``."""
    m = {k: _angle(v, t) for k, v in char["motion"].items()}
    L = char["height"] * height  # body height in pixels
    up = lambda a: np.array([math.sin(a), -math.cos(a)])  # noqa: E731  (unit vector, angle from vertical)
    feet_y = height * 0.5 + L * (0.5 + m["bob"])  # the body is centred vertically
    hip_c = np.array([(char["x"] + m["drift"]) * width, feet_y - (char["thigh"] + char["shin"]) * L])
    lean = m["lean"]
    side = np.array([math.cos(lean), math.sin(lean)])  # towards the image right
    neck = hip_c + up(lean) * char["torso"] * L
    kp = np.zeros((18, 2))
    kp[1] = neck
    kp[2] = neck - side * char["shoulder"] * L
    kp[5] = neck + side * char["shoulder"] * L
    kp[8] = hip_c - side * char["hip"] * L
    kp[11] = hip_c + side * char["hip"] * L

    def down(a):  # unit vector, angle from straight down; positive turns towards the image right
        return np.array([math.sin(a), math.cos(a)])

    # arms: positive angles lift the arm outwards; elbows bend further the same way
    kp[3] = kp[2] + down(-m["r_arm"] + lean) * char["upper_arm"] * L
    kp[4] = kp[3] + down(-m["r_arm"] - m["r_elbow"] + lean) * char["forearm"] * L
    kp[6] = kp[5] + down(m["l_arm"] + lean) * char["upper_arm"] * L
    kp[7] = kp[6] + down(m["l_arm"] + m["l_elbow"] + lean) * char["forearm"] * L
    # legs: positive angles spread the leg outwards; knees bend the shin back inwards
    kp[9] = kp[8] + down(-m["r_leg"]) * char["thigh"] * L
    kp[10] = kp[9] + down(-m["r_leg"] + m["r_knee"]) * char["shin"] * L
    kp[12] = kp[11] + down(m["l_leg"]) * char["thigh"] * L
    kp[13] = kp[12] + down(m["l_leg"] - m["l_knee"]) * char["shin"] * L
    # head
    tilt = lean + m["head_tilt"]
    head_c = neck + up(tilt) * (char["neck"] + char["head_r"]) * L
    hs = np.array([math.cos(tilt), math.sin(tilt)])
    r = char["head_r"] * L
    kp[0] = head_c - up(tilt) * 0.15 * r
    kp[14] = head_c - hs * 0.4 * r + up(tilt) * 0.2 * r
    kp[15] = head_c + hs * 0.4 * r + up(tilt) * 0.2 * r
    kp[16] = head_c - hs * 0.95 * r + up(tilt) * 0.1 * r
    kp[17] = head_c + hs * 0.95 * r + up(tilt) * 0.1 * r
    return kp


def _pattern(kind: str, h: int, w: int, c1, c2, period: float, origin) -> np.ndarray:
    """(h, w, 3) uint8 texture; the pattern moves with ``origin`` (x, y) so it sticks to the body."""
    if kind == "plain":
        return np.broadcast_to(np.array(c1, np.uint8), (h, w, 3))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (x - origin[0]) / period
    y = (y - origin[1]) / period
    if kind == "hstripes":
        m = np.floor(y) % 2 == 0
    elif kind == "vstripes":
        m = np.floor(x) % 2 == 0
    elif kind == "checks":
        m = (np.floor(x) + np.floor(y)) % 2 == 0
    elif kind == "dots":
        m = ((x % 1 - 0.5) ** 2 + (y % 1 - 0.5) ** 2) > 0.08
    else:
        raise ValueError(kind)
    return np.where(m[..., None], np.array(c1, np.uint8), np.array(c2, np.uint8))


def _background(char: dict, h: int, w: int) -> np.ndarray:
    c1, c2 = np.array(char["bg"], np.float32), np.array(char["bg2"], np.float32)
    kind = char["bg_pattern"]
    if kind == "plain":
        return np.broadcast_to(c1.astype(np.uint8), (h, w, 3)).copy()
    if kind == "checks":
        return _pattern("checks", h, w, char["bg"], char["bg2"], h / 6, (0, 0)).copy()
    if kind == "floor":
        y = np.arange(h, dtype=np.float32)[:, None, None]
        out = np.where(y < 0.75 * h, c1, c2 * (0.7 + 0.3 * (y - 0.75 * h) / (0.25 * h)))
        return np.broadcast_to(out, (h, w, 3)).astype(np.uint8)
    t = np.linspace(0, 1, h if kind == "vgradient" else w, dtype=np.float32)
    g = c1 * (1 - t[:, None]) + c2 * t[:, None]
    g = g[:, None, :] if kind == "vgradient" else g[None, :, :]
    return np.broadcast_to(g, (h, w, 3)).astype(np.uint8)


def _capsule(draw: ImageDraw.ImageDraw, a, b, width: float, fill) -> None:
    a, b = tuple(map(float, a)), tuple(map(float, b))
    draw.line([a, b], fill=fill, width=max(1, int(round(width))))
    r = width / 2
    for p in (a, b):
        draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=fill)


def render_character(char: dict, kp: np.ndarray, height: int, width: int, background: np.ndarray,
                     with_parts: bool = False):
    """The character at keypoints ``kp`` over ``background`` (rendered at ``_supersample``x), uint8.

    ``with_parts``: also its body-part map, (height, width) uint8 indices into ``PARTS`` (the label
    drawn last at each pixel's centre, by the same shapes as the picture)."""
    s = _supersample(height, width)
    H, W = height * s, width * s
    k = kp * s
    L = char["height"] * height * s
    period = char["pattern_period"] * L
    origin = (k[1] + k[8] + k[11]) / 3
    canvas = Image.fromarray(background)
    parts = Image.new("L", (W, H), PART_INDEX["background"])
    lab = ImageDraw.Draw(parts)
    top = Image.fromarray(np.ascontiguousarray(_pattern(char["top_pattern"], H, W, char["top"], char["top2"], period, origin)))
    bottom = Image.fromarray(
        np.ascontiguousarray(_pattern(char["bottom_pattern"], H, W, char["bottom"], char["bottom2"], period, origin))
    )
    arm_w, leg_w = char["limb_w"] * L, char["leg_w"] * L

    # legs (bottom texture), shoes
    mask = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(mask)
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        _capsule(d, k[hip], k[knee], leg_w, 255)
        _capsule(d, k[knee], k[ankle], leg_w * 0.85, 255)
    if char["skirt"]:
        hip_c = (k[8] + k[11]) / 2
        knee_y = (k[9][1] + k[12][1]) / 2
        half = abs(k[11][0] - k[8][0]) / 2 + leg_w
        d.polygon([tuple(k[8] - [leg_w * 0.5, 0]), tuple(k[11] + [leg_w * 0.5, 0]),
                   (hip_c[0] + half * 1.5, knee_y), (hip_c[0] - half * 1.5, knee_y)], fill=255)  # fmt: skip
    canvas.paste(bottom, (0, 0), mask)
    parts.paste(PART_INDEX["bottom"], (0, 0), mask)
    d = ImageDraw.Draw(canvas)
    for knee, ankle in ((9, 10), (12, 13)):
        v = k[ankle] - k[knee]
        foot = k[ankle] + v / (np.linalg.norm(v) + 1e-6) * leg_w * 0.3
        for draw, fill in ((d, char["shoes"]), (lab, PART_INDEX["shoes"])):
            _capsule(draw, k[ankle], foot + [0, 0.01], leg_w * 1.1, fill)

    # torso (top texture) with upper arms as sleeves
    mask = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(mask)
    sh_out = (k[5] - k[2]) / (np.linalg.norm(k[5] - k[2]) + 1e-6) * arm_w * 0.5
    d.polygon([tuple(k[2] - sh_out), tuple(k[5] + sh_out), tuple(k[11] + sh_out * 0.6), tuple(k[8] - sh_out * 0.6)], fill=255)
    _capsule(d, k[2], k[5], arm_w, 255)
    for sh, el in ((2, 3), (5, 6)):
        _capsule(d, k[sh], k[el], arm_w, 255)
    canvas.paste(top, (0, 0), mask)
    parts.paste(PART_INDEX["top"], (0, 0), mask)

    d = ImageDraw.Draw(canvas)
    skin = PART_INDEX["skin"]
    for el, wr in ((3, 4), (6, 7)):  # forearms and hands (skin)
        r = arm_w * 0.6
        for draw, fill in ((d, char["skin"]), (lab, skin)):
            _capsule(draw, k[el], k[wr], arm_w * 0.8, fill)
            draw.ellipse([k[wr][0] - r, k[wr][1] - r, k[wr][0] + r, k[wr][1] + r], fill=fill)
    # neck and head
    head_c = (k[16] + k[17]) / 2
    r = char["head_r"] * L
    for draw, face, hair in ((d, char["skin"], char["hair"]), (lab, skin, PART_INDEX["hair"])):
        _capsule(draw, k[1], head_c, arm_w * 0.8, face)
        draw.ellipse([head_c[0] - r, head_c[1] - r * 1.1, head_c[0] + r, head_c[1] + r * 1.1], fill=face)
        draw.chord([head_c[0] - r * 1.05, head_c[1] - r * 1.2, head_c[0] + r * 1.05, head_c[1] + r * 0.9], 180, 360,
                   fill=hair)
    for eye in (14, 15):  # the eyes count as skin (the face) in the part map
        e = k[eye]
        er = max(r * 0.12, 1.0)
        d.ellipse([e[0] - er, e[1] - er, e[0] + er, e[1] + er], fill=(20, 20, 20))
    frame = np.asarray(canvas.resize((width, height), Image.BOX))
    if not with_parts:
        return frame
    return frame, np.asarray(parts.resize((width, height), Image.NEAREST))


def _ellipse_polygon(center, half_len: float, half_width: float, angle: float, n: int = 24) -> list:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ca, sa = math.cos(angle), math.sin(angle)
    x = half_len * np.cos(t)
    y = half_width * np.sin(t)
    return [(center[0] + ca * xi - sa * yi, center[1] + sa * xi + ca * yi) for xi, yi in zip(x, y)]


def render_pose(kp: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenPose-18 body rendering (DWPose style) on black, uint8 (height, width, 3).

    Stick half-width and joint radius are DWPose's 4 px at 512 px, scaled with the image (>= 1 px).
    """
    s = _supersample(height, width)
    scale = min(height, width) / 512
    stick = max(1.0, 4 * scale) * s
    radius = max(1.0, 4 * scale) * s
    k = kp * s
    canvas = Image.new("RGB", (width * s, height * s), (0, 0, 0))
    d = ImageDraw.Draw(canvas)
    for i, (a, b) in enumerate(LIMBS[:17]):
        pa, pb = k[a], k[b]
        centre = (pa + pb) / 2
        v = pb - pa
        d.polygon(_ellipse_polygon(centre, np.linalg.norm(v) / 2, stick, math.atan2(v[1], v[0])), fill=COLORS[i])
    canvas = Image.fromarray((np.asarray(canvas) * 0.6).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    for i in range(18):
        x, y = k[i]
        d.ellipse([x - radius, y - radius, x + radius, y + radius], fill=COLORS[i])
    return np.asarray(canvas.resize((width, height), Image.BOX))


def render_video(
    seed: int, index: int = 0, num_frames: int = 48, height: int = 64, width: int = 64, backgrounds=None,
    palette: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic video ``index`` of ``seed``: frames (T,H,W,3) uint8, poses (T,H,W,3) uint8, keypoints (T,18,2)."""
    frames, poses, kps = [], [], []
    for frame, pose, kp in iter_video(seed, index, num_frames, height, width, backgrounds, palette):
        frames.append(frame)
        poses.append(pose)
        kps.append(kp)
    return np.stack(frames), np.stack(poses), np.stack(kps)


def iter_video(seed: int, index: int, num_frames: int, height: int, width: int, backgrounds=None,
               palette: str | None = None) -> Iterator[tuple]:
    """Frame by frame: ``(frame, pose, keypoints)``."""
    char = make_character(_rng(seed, index), backgrounds, palette)
    s = _supersample(height, width)
    bg = _background(char, height * s, width * s)
    for t in range(num_frames):
        kp = keypoints(char, float(t), height, width)
        yield render_character(char, kp, height, width, bg), render_pose(kp, height, width), kp


def performance(char: dict, motion: dict, num_frames: int, height: int, width: int, start: int = 0) -> dict:
    """``char`` (its look and body proportions) performing ``motion``'s movement (another
    character's joint-angle waves, drift and position), frames ``start .. start + num_frames - 1``:
    ``frames``, ``poses`` (T, H, W, 3) uint8, ``parts`` (T, H, W) uint8 (``PARTS``), ``keypoints`` (T, 18, 2)."""
    actor = dict(char, motion=motion["motion"], x=motion["x"])
    s = _supersample(height, width)
    bg = _background(actor, height * s, width * s)
    out = {"frames": [], "poses": [], "parts": [], "keypoints": []}
    for t in range(start, start + num_frames):
        kp = keypoints(actor, float(t), height, width)
        frame, parts = render_character(actor, kp, height, width, bg, with_parts=True)
        for key, value in (("frames", frame), ("poses", render_pose(kp, height, width)), ("parts", parts), ("keypoints", kp)):
            out[key].append(value)
    return {k: np.stack(v) for k, v in out.items()}


def video_name(index: int) -> str:
    return f"char_{index:05d}"


def write_synthetic_videos(
    root: str | os.PathLike,
    num_videos: int,
    *,
    seed: int = 0,
    num_frames: int = 48,
    height: int = 64,
    width: int = 64,
    fps: float = 8.0,
    lossless: bool = True,
    backgrounds=None,
) -> list[tuple[str, str]]:
    """Writes ``root/char_XXXXX.mp4`` and ``root_dwpose/char_XXXXX.mp4``; returns the (video, pose) paths.

    ``lossless`` (default) uses libx264rgb qp 0, so the decoded frames equal ``render_video``'s exactly.
    """
    root = os.fspath(root).rstrip("/")
    pose_root = root + "_dwpose"
    if not storage.is_url(root):  # (a gs:// root has no folders to make: each video is one object)
        os.makedirs(root, exist_ok=True)
        os.makedirs(pose_root, exist_ok=True)
    backgrounds = check_backgrounds(backgrounds)
    out = []
    for i in range(num_videos):
        frames, poses, _ = render_video(seed, i, num_frames, height, width, backgrounds)
        vp = os.path.join(root, video_name(i) + ".mp4")
        pp = os.path.join(pose_root, video_name(i) + ".mp4")
        write_video(vp, frames, fps=fps, lossless=lossless)
        write_video(pp, poses, fps=fps, lossless=lossless)
        out.append((vp, pp))
    return out


def synthetic_examples(
    num_videos: int, *, seed: int = 0, num_frames: int = 48, height: int = 64, width: int = 64, fps: float = 8.0,
    jpeg_quality: int = 95, noise: float = 0.0, backgrounds=None, palette: str | None = None,
) -> Iterator[dict]:  # fmt: skip
    """Dataset records (see ``dataset.py``) of synthetic videos, without writing video files.

    ``noise``: sigma of Gaussian noise added to the frames (not the poses), like camera noise; it
    makes the JPEGs about as large as real footage's (sigma 2 at 512x512: ~85 kB per frame).
    """
    backgrounds = check_backgrounds(backgrounds)
    rng = np.random.default_rng(seed)
    for i in range(num_videos):
        frames, poses = [], []
        for frame, pose, _ in iter_video(seed, i, num_frames, height, width, backgrounds, palette):
            if noise:
                frame = np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
            frames.append(encode_jpeg(frame, jpeg_quality))
            poses.append(encode_png(pose))
        from data_pipelines import dataset as dataset_lib

        yield dataset_lib.make_example(video_name(i), frames, poses, fps, (height, width), (height, width))


def write_synthetic_dataset(
    path: str | os.PathLike,
    num_videos: int,
    *,
    seed: int = 0,
    num_frames: int = 48,
    height: int = 64,
    width: int = 64,
    fps: float = 8.0,
    overwrite: bool = False,
    backgrounds=None,
    palette: str | None = None,
) -> str:
    """The prepared dataset of ``num_videos`` synthetic videos at ``path`` (as ``anim-jax prepare`` writes it);
    ``palette``: the characters' clothes colours (``make_character``)."""
    backgrounds = check_backgrounds(backgrounds)  # before anything is written
    if palette is not None and palette not in PALETTE_MODES:
        raise ValueError(f"palette must be one of {PALETTE_MODES} or None, got {palette!r}")
    examples = synthetic_examples(num_videos, seed=seed, num_frames=num_frames, height=height, width=width, fps=fps,
                                  backgrounds=backgrounds, palette=palette)
    report = {
        "source": "synthetic",
        "seed": seed,
        "num_videos": num_videos,
        "num_frames": num_videos * num_frames,
        "skipped": [],
        "truncated": [],
    }
    from data_pipelines import dataset as dataset_lib

    return dataset_lib.build_dataset(path, examples, report=report, overwrite=overwrite, description="anim_jax synthetic characters")


def _palette_record(args) -> dict:
    seed, index, num_frames, height, width, palette = args
    frames, poses = [], []
    for frame, pose, _ in iter_video(seed, index, num_frames, height, width, ("plain",), palette):
        frames.append(encode_jpeg(frame, 95))
        poses.append(encode_png(pose))
    # The record format of ``dataset.make_example`` (tests/test_demo.py checks they agree), built here
    # so that an in-memory training set needs no TFDS.
    return {"id": video_name(index), "frames": frames, "poses": poses, "num_frames": num_frames, "fps": 8.0,
            "height": height, "width": width, "pose_height": height, "pose_width": width}


def palette_records(num_videos: int, *, seed: int = 0, num_frames: int = 24, height: int = 64, width: int = 64,
                    palette: str = "train", workers: int = 1) -> list[dict]:
    """Dataset records (``dataset.make_example``'s format, JPEG frames and PNG poses) of palette-mode
    characters on plain backgrounds, in memory: a random-access training source for
    ``grain_pipeline.make_map_dataset(source=...)``. ``workers`` > 1 renders videos in that many
    processes (rendering is CPU-bound Python, ~40 ms per 64x64 frame)."""
    if palette not in PALETTE_MODES:
        raise ValueError(f"palette must be one of {PALETTE_MODES}, got {palette!r}")
    jobs = [(seed, i, num_frames, height, width, palette) for i in range(num_videos)]
    if workers <= 1:
        return [_palette_record(j) for j in jobs]
    import multiprocessing

    # spawn: the caller may already run JAX threads, which fork would copy half-alive
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(_palette_record, jobs, chunksize=max(1, num_videos // (4 * workers)))
