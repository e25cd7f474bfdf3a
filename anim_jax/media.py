"""Reading inference inputs and writing results: images, pose sequences, mp4 / GIF / grids.

Inputs are normalised to RGB uint8 arrays here, with clear errors for what we cannot use, so the
pipeline below never sees an image mode or bit depth it has to guess about.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from anim_jax import storage
from anim_jax.atomic import atomic_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif")


class InputError(ValueError):
    """An input file or array the pipeline cannot use; the message names it and says why."""


def to_rgb_image(image, *, name: str = "image") -> Image.Image:
    """A PIL RGB image from a path, PIL image or (H, W, 3|4) / (H, W) uint8 / float array.

    RGBA is composited on white (a transparent background is not "black"); grayscale and palette
    images are converted; 16-bit images are scaled down to 8 bits; anything else is refused.
    """
    if isinstance(image, (str, os.PathLike)):
        path = storage.as_path(image)
        if not path.is_file():
            raise InputError(f"{name} {str(path)!r} does not exist")
        try:
            with path.open("rb") as f, Image.open(f) as im:
                im.load()
                return to_rgb_image(im, name=f"{name} {str(path)!r}")
        except (OSError, Image.UnidentifiedImageError) as e:
            raise InputError(f"{name} {str(path)!r} is not a readable image: {e}") from e
    if isinstance(image, Image.Image):
        mode = image.mode
        if mode == "RGB":
            return image
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if mode in ("L", "P", "CMYK", "YCbCr", "1"):
            return image.convert("RGB")
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(image).astype(np.float64)
            peak = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
            return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
        raise InputError(f"{name} has image mode {mode!r}, which is not supported (expected RGB, RGBA, L or 16-bit)")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputError(f"{name} array has shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
            raise InputError(f"{name} float array must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
        arr = (np.clip(arr, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise InputError(f"{name} array has dtype {arr.dtype}; expected uint8, uint16 or float in [0, 1]")
    return to_rgb_image(Image.fromarray(arr), name=name)


def read_video_frames(path: str | os.PathLike, max_frames: int | None = None) -> tuple[list[Image.Image], float]:
    """Decodes a video into RGB PIL frames; returns (frames, fps)."""
    import av

    path = storage.as_path(path)
    if not path.is_file():
        raise InputError(f"pose video {str(path)!r} does not exist")
    frames: list[Image.Image] = []
    try:
        with storage.local_copy(path) as local, av.open(str(local)) as container:
            if not container.streams.video:
                raise InputError(f"{str(path)!r} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 30.0
            for frame in container.decode(stream):
                frames.append(frame.to_image().convert("RGB"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as e:
        raise InputError(f"{str(path)!r} is not a readable video: {e}") from e
    if not frames:
        raise InputError(f"pose video {str(path)!r} contains no frames")
    return frames, fps


def load_pose_frames(poses, *, max_frames: int | None = None) -> tuple[list[Image.Image], float | None]:
    """Pose frames from a video path, a folder of images (sorted by name), a list or an array (F, H, W, 3)."""
    if isinstance(poses, (str, os.PathLike)):
        path = storage.as_path(poses)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"pose folder {str(path)!r} contains no images ({', '.join(IMAGE_SUFFIXES)})")
            files = files[:max_frames] if max_frames else files
            return [to_rgb_image(f, name="pose frame") for f in files], None
        return read_video_frames(path, max_frames)
    if isinstance(poses, np.ndarray):
        if poses.ndim != 4:
            raise InputError(f"pose array has shape {poses.shape}; expected (frames, H, W, 3)")
        poses = list(poses)
    frames = [to_rgb_image(p, name=f"pose frame {i}") for i, p in enumerate(poses)]
    if not frames:
        raise InputError("no pose frames were given")
    return (frames[:max_frames] if max_frames else frames), None


def checked_frames(video, name: str, *, atol: float = 1e-6) -> np.ndarray:
    """A video (F, H, W, 3) (one frame (H, W, 3) becomes F = 1) as the metrics take it: uint8 as is,
    floats checked to lie in [0, 1] (within ``atol``) and clipped there, in their own dtype."""
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name}: expected (frames, H, W, 3), got {video.shape}")
    if video.dtype == np.uint8:
        return video
    if not np.issubdtype(video.dtype, np.floating):
        raise ValueError(f"{name}: dtype {video.dtype} is not uint8 or float")
    lo, hi = float(video.min()), float(video.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -atol or hi > 1 + atol:
        raise ValueError(f"{name}: float frames must be in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return np.clip(video, 0.0, 1.0)


def resize_lanczos(image: Image.Image, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 after PIL LANCZOS resizing, as the original's VaeImageProcessor does."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> None:
    """H.264 mp4 of (F, H, W, 3) uint8 frames, written atomically. Odd sizes are padded by one pixel."""
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 expects (frames, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    # yuv420p needs even sizes.
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    with atomic_file(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=max(1, int(round(fps))))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium"}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0) -> None:
    frames = np.asarray(frames)
    images = [Image.fromarray(f) for f in frames]
    with atomic_file(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(1, int(round(1000 / fps))), loop=0)


def side_by_side(panels: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """Concatenates (F, H, W, 3) uint8 videos (or (H, W, 3) images, repeated) left to right."""
    num_frames = max(p.shape[0] for p in panels if p.ndim == 4)
    height = max(p.shape[-3] for p in panels)
    cols = []
    for p in panels:
        p = np.broadcast_to(p[None], (num_frames,) + p.shape) if p.ndim == 3 else p
        if p.shape[1] != height:
            p = np.stack([np.asarray(Image.fromarray(f).resize((round(f.shape[1] * height / f.shape[0]), height)))
                          for f in p])
        cols.append(p)
        cols.append(np.zeros((num_frames, height, pad, 3), np.uint8))
    return np.concatenate(cols[:-1], axis=2)
