"""From a video of a dancer to the pose pictures that drive Animate Anyone, and the side-by-side grid.

``driving_poses``: DWPose keypoints of the driving video (``anim_jax.pose.PoseExtractor``, sharded over
the local devices), aligned to the reference character's body (``anim_jax.pose.align``: the dancer's
joint angles on the character's proportions, standing where the character stands) unless
``align=False``, then drawn as Moore-AnimateAnyone draws poses. The aligned poses live in the
reference image's pixels, so their pictures have the reference's aspect ratio.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anim_jax import media, storage

GRID_PANEL_HEIGHT = 256  # a grid panel is at least this tall, so a tiny model's output is watchable
GRID_LABELS = ("reference", "driving video", "aligned pose", "result")


@dataclasses.dataclass
class DrivingPoses:
    """driving: the driving video's keypoints as extracted (``Poses``); reference: the reference's;
    drawn: the keypoints that were drawn (aligned, or ``driving`` itself without alignment);
    pictures: (F, H, W, 3) uint8 Moore pictures of ``drawn``; fps: the driving video's."""

    driving: object
    reference: object | None
    drawn: object
    pictures: np.ndarray
    fps: float | None

    def save(self, out: str | os.PathLike) -> list[pathlib.Path]:
        """``OUT_pose.mp4`` (the pictures; ``anim-jax animate --pose`` takes it back) and
        ``OUT_keypoints.npz`` (the drawn keypoints) and ``OUT_driving_keypoints.npz`` (as extracted,
        to align to another reference without extracting again) beside ``out``."""
        paths = saved_pose_paths(out)
        media.write_mp4(paths[0], self.pictures, fps=self.fps or 8.0)
        self.drawn.save(paths[1])
        self.driving.save(paths[2])
        return paths


def saved_pose_paths(out: str | os.PathLike) -> list[pathlib.Path]:
    out = storage.as_path(out)
    return [out.with_name(out.stem + suffix) for suffix in ("_pose.mp4", "_keypoints.npz", "_driving_keypoints.npz")]


def reference_image(reference, frame: int = 0):
    """The reference as an RGB image: an image (path, PIL, array) as is, or frame ``frame`` of a video path."""
    if isinstance(reference, (str, os.PathLike)) and pathlib.Path(reference).suffix.lower() in media.VIDEO_SUFFIXES:
        frames = read_frames(reference, frame + 1, name="reference video")
        if len(frames) <= frame:
            raise media.InputError(f"reference video {os.fspath(reference)!r} has {len(frames)} frames; "
                                   f"--reference-frame {frame} is past its end")
        return frames[frame]
    if frame:
        raise media.InputError(f"reference frame {frame} was asked for, but the reference {reference!r} is an image")
    return media.to_rgb_image(reference, name="reference image")


def read_frames(path, max_frames: int | None = None, *, name: str = "driving video") -> list[Image.Image]:
    try:
        return media.read_video_frames(path, max_frames)[0]
    except media.InputError as e:
        raise media.InputError(str(e).replace("pose video", name)) from None


def _extractor(pose_extractor):
    from anim_jax.pose.extract import PoseExtractor

    if pose_extractor is None:
        raise ValueError("driving_video needs pose_extractor= (a PoseExtractor or a converted DWPose directory)")
    if isinstance(pose_extractor, (str, os.PathLike)):
        return PoseExtractor.from_pretrained(pose_extractor)
    return pose_extractor


def driving_poses(driving_video, reference, pose_extractor, *, align: bool = True, max_frames: int | None = None,
                  progress: bool = False) -> DrivingPoses:
    """Poses of ``driving_video`` (a path or (F, H, W, 3) uint8 frames), aligned to ``reference`` (an
    RGB image) unless ``align`` is False, and their pictures (at the detection size, Moore's)."""
    from anim_jax.pose.align import align_poses

    extractor = _extractor(pose_extractor)
    if isinstance(driving_video, (str, os.PathLike)) and storage.is_url(driving_video):
        with storage.local_copy(driving_video) as local:  # downloaded once: it is read more than once below
            return driving_poses(local, reference, extractor, align=align, max_frames=max_frames, progress=progress)
    fps = None
    if isinstance(driving_video, (str, os.PathLike)):
        if max_frames is None:
            driving = extractor(driving_video, progress=progress)
        else:  # only the frames that will be animated
            frames, fps = media.read_video_frames(driving_video, max_frames)
            driving = extractor(np.stack([np.asarray(f) for f in frames]), progress=progress)
        fps = driving.fps or fps
        if fps is None:
            fps = media.read_video_frames(driving_video, 1)[1]
    else:
        frames = np.asarray(driving_video)
        driving = extractor(frames[:max_frames] if max_frames else frames, progress=progress)
    if len(driving.frames_without_person) == len(driving):
        raise media.InputError("no person was found in any frame of the driving video")
    ref_poses = None
    drawn = driving
    if align:
        ref_poses = extractor(np.asarray(media.to_rgb_image(reference))[None])
        if ref_poses.num_persons[0] == 0:
            raise media.InputError("no person was found in the reference image, so the poses cannot be aligned "
                                   "to it (--no-align draws the driving poses as they are)")
        try:
            drawn = align_poses(driving, ref_poses)
        except ValueError as e:  # e.g. no neck in the reference
            raise media.InputError(f"{e} (--no-align / align=False draws the driving poses as they are)") from None
    pictures = np.stack(list(drawn.render()))
    return DrivingPoses(driving=driving, reference=ref_poses, drawn=drawn, pictures=pictures, fps=fps)


def labelled(video: np.ndarray, label: str, height: int) -> np.ndarray:
    """(F, H, W, 3) uint8 resized to ``height`` (aspect kept) with ``label`` on a dark strip above it."""
    video = np.asarray(video)
    video = video[None] if video.ndim == 3 else video
    width = max(1, round(video.shape[2] * height / video.shape[1]))
    resized = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.LANCZOS)) for f in video])
    font = ImageFont.load_default(size=max(12, height // 20))
    strip_h = int(font.size * 1.6)
    strip = Image.new("RGB", (width, strip_h), (24, 24, 24))
    ImageDraw.Draw(strip).text((6, strip_h // 2), label, fill=(235, 235, 235), font=font, anchor="lm")
    strip = np.broadcast_to(np.asarray(strip)[None], (len(resized),) + np.asarray(strip).shape)
    return np.concatenate([strip, resized], axis=1)


def grid(reference: np.ndarray, driving_frames: np.ndarray, poses: np.ndarray, result: np.ndarray,
         *, height: int | None = None) -> np.ndarray:
    """reference | driving frame | aligned pose | result, labelled, every panel ``height`` pixels tall
    (default: the result's height, at least ``GRID_PANEL_HEIGHT``). Returns (F, H', W', 3) uint8."""
    height = height or max(GRID_PANEL_HEIGHT, result.shape[1])
    height += height % 2
    panels = [labelled(p, label, height) for p, label in zip((reference, driving_frames, poses, result), GRID_LABELS)]
    panels[0] = panels[0][0]  # one picture, shown beside every frame
    return media.side_by_side(panels, pad=4)
