"""DWPose pose extraction on the device mesh: frames -> whole-body keypoints (and Moore's pictures).

``PoseExtractor`` runs DWPose's two networks (YOLOX person detector, RTMPose whole-body) jitted, in
fixed-size batches sharded over a 1-D ``data`` mesh of the local devices (N devices take N shards of
every batch), with the host doing what DWPose does in numpy/OpenCV (``preprocess``): resizing,
letterboxing, NMS, affine crops and the SimCC rescale. Frames from several videos share batches, so
a folder of clips goes through in one pass with one compilation per shape.

Defaults follow Moore-AnimateAnyone's ``DWposeDetector``: frames are resized to the detection size
(shorter side 512, sides multiples of 64) and the person with the highest mean body score is kept.
``detect_resolution=None`` detects at the source size; ``all_persons=True`` keeps everyone.

Two deliberate differences from Moore, both switchable:
* a frame where the detector finds nobody gets an empty pose (a black picture), counted in
  ``Poses.frames_without_person``; Moore instead runs the pose network on the whole frame and draws
  whatever it finds (``no_person="full_image"`` does that);
* keypoints are returned in source-frame pixels (``x_src = x_det / W_det * W_src``, the scaling of
  Moore's normalised coordinates), not normalised to the detection size.
"""

from __future__ import annotations

import collections
import contextlib
import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from anim_jax.pose import preprocess as pp

NO_PERSON_MODES = ("empty", "full_image")


class PoseInputError(ValueError):
    """An input the extractor cannot use; the message names it and says why."""


# ----------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class Poses:
    """Keypoints of one video (or image sequence).

    keypoints: (F, P, 133, 2) float64 COCO-WholeBody (x, y) in source-frame pixels;
    scores: (F, P, 133) float32; person slots past ``num_persons[f]`` are zero;
    num_persons: (F,) int32, 0 where nobody was found;
    image_size: (h, w) of the source frames; detect_size: (h, w) the detector saw (Moore's canvas);
    fps: frame rate of the source video, when known.
    """

    keypoints: np.ndarray
    scores: np.ndarray
    num_persons: np.ndarray
    image_size: tuple[int, int]
    detect_size: tuple[int, int]
    fps: float | None = None

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def frames_without_person(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.num_persons == 0)]

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints (n, 133, 2), scores (n, 133)) of frame ``i``'s persons."""
        n = int(self.num_persons[i])
        return self.keypoints[i, :n], self.scores[i, :n]

    def openpose_body(self) -> tuple[np.ndarray, np.ndarray]:
        """OpenPose-18 bodies with the inserted neck, as Moore's ``DWposeDetector`` builds them:
        ((F, P, 18, 2) source pixels, (F, P, 18) scores; the neck's score is 1 or 0)."""
        f, p = self.scores.shape[:2]
        kp, sc = pp.moore_layout(self.keypoints.reshape(f * p, 133, 2), self.scores.reshape(f * p, 133))
        return kp[:, :18].reshape(f, p, 18, 2), sc[:, :18].reshape(f, p, 18)

    def canvas_size(self, size: str = "detect") -> tuple[int, int]:
        if size not in ("detect", "source"):
            raise ValueError(f"size must be 'detect' (Moore's convention) or 'source', got {size!r}")
        return tuple(self.detect_size if size == "detect" else self.image_size)

    def render_frame(self, i: int, size: str = "detect") -> np.ndarray:
        from anim_jax.pose.render import render_pose

        kp, sc = self.frame(i)
        return render_pose(kp, sc, self.image_size, self.canvas_size(size))

    def render(self, size: str = "detect") -> Iterator[np.ndarray]:
        """Moore's skeleton pictures, one (H, W, 3) uint8 per frame, at the detection size (Moore's
        convention, what its models were trained on) or the source size."""
        self.canvas_size(size)
        return (self.render_frame(i, size) for i in range(len(self)))

    def save(self, path: str | os.PathLike) -> None:
        """A compressed .npz (written atomically): keypoints, scores, num_persons, image_size, detect_size, fps."""
        from anim_jax import atomic

        with atomic.atomic_open(path, "wb") as f:
            np.savez_compressed(
                f, keypoints=self.keypoints, scores=self.scores, num_persons=self.num_persons,
                image_size=np.array(self.image_size), detect_size=np.array(self.detect_size),
                fps=np.array(np.nan if self.fps is None else self.fps),
            )  # fmt: skip

    @classmethod
    def load(cls, path) -> "Poses":
        """From a path or a binary file object (e.g. the ``keypoints`` bytes of a prepared record)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                fps = float(z["fps"])
                return cls(
                    keypoints=z["keypoints"], scores=z["scores"], num_persons=z["num_persons"],
                    image_size=tuple(int(v) for v in z["image_size"]), detect_size=tuple(int(v) for v in z["detect_size"]),
                    fps=None if math.isnan(fps) else fps,
                )  # fmt: skip
        except (OSError, KeyError, ValueError) as e:
            name = repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "the data"
            raise PoseInputError(f"{name} is not a keypoint file written by anim-jax pose: {e}") from e


@dataclasses.dataclass
class _Frame:
    """One frame on its way through the extractor."""

    key: Any
    image_size: tuple[int, int]
    detect: np.ndarray  # the frame at the detection size
    letterboxed: np.ndarray
    ratio: float


@dataclasses.dataclass
class FramePoses:
    key: Any
    keypoints: np.ndarray  # (n, 133, 2) source pixels
    scores: np.ndarray  # (n, 133)
    image_size: tuple[int, int]
    detect_size: tuple[int, int]


def stack_poses(frames: Sequence[FramePoses], fps: float | None = None) -> Poses:
    if not frames:
        raise PoseInputError("no frames to extract poses from")
    sizes = {f.image_size for f in frames}
    if len(sizes) > 1:
        raise PoseInputError(f"frames of one sequence must share a size, got {sorted(sizes)}")
    p = max(1, max(len(f.keypoints) for f in frames))
    kp = np.zeros((len(frames), p, 133, 2))
    sc = np.zeros((len(frames), p, 133), np.float32)
    n = np.zeros(len(frames), np.int32)
    for i, f in enumerate(frames):
        n[i] = len(f.keypoints)
        kp[i, : n[i]] = f.keypoints
        sc[i, : n[i]] = f.scores
    return Poses(kp, sc, n, frames[0].image_size, frames[0].detect_size, fps)


# ----------------------------------------------------------------------------------------------
# The networks on the mesh


class DeviceNetworks:
    """DWPose's two networks jitted over a 1-D ``data`` mesh; numpy in, numpy out.

    ``detect``: (B, h, w, 3) uint8 RGB letterboxed frames -> (B, A, 6) float32 raw detector output
    (box offsets, objectness, person score; the other classes are never read).
    ``estimate``: (N, h, w, 3) uint8 RGB crops -> SimCC maxima (locs (N, K, 2), vals (N, K)).
    Both flip to BGR and (for the pose network) normalise on the device, as DWPose feeds its networks;
    uint8 travels to the device (a quarter of float32's bytes). Batches are padded to a fixed size
    (a multiple of the device count), so each network compiles once per mesh and size; the compiled
    functions are shared by all extractors with the same network structure. On CPU they are prepared
    and compiled by ``anim_jax.pose.compile_options``: the detector's wide 3x3 convolutions as Winograd
    convolutions (``winograd``: None = on CPU only) and XLA's own convolutions instead of YNNPACK's.
    """

    def __init__(self, detector, pose, *, batch_size: int = 8, mesh=None, detector_input=pp.DETECTOR_INPUT,
                 winograd: bool | None = None):
        import jax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P

        from anim_jax.parallel import make_mesh
        from anim_jax.pose import compile_options

        if mesh is None:
            local = jax.local_devices()
            mesh = make_mesh((len(local),), ("data",), devices=local)
        if len(mesh.axis_names) != 1:
            raise ValueError(f"the pose extractor shards frames over a 1-D mesh, got axes {mesh.axis_names}")
        self.mesh = mesh
        self.batch_size = pp.ceil_to(max(1, batch_size), mesh.size)
        self.detector_input = tuple(detector_input)
        if any(s % 32 for s in self.detector_input):
            raise ValueError(f"detector input {self.detector_input} must be multiples of 32")
        config = getattr(pose, "config", None)
        self.pose_input = tuple(getattr(config, "input_size", pp.POSE_INPUT))
        if getattr(config, "num_keypoints", pp.NUM_WHOLEBODY) != pp.NUM_WHOLEBODY:
            raise ValueError(f"the pose network predicts {config.num_keypoints} keypoints; the extractor needs "
                             f"COCO-WholeBody's {pp.NUM_WHOLEBODY}")  # fmt: skip
        if getattr(config, "simcc_split_ratio", pp.SIMCC_SPLIT_RATIO) != pp.SIMCC_SPLIT_RATIO:
            raise ValueError(f"SimCC split ratio {config.simcc_split_ratio}; DWPose's decode uses {pp.SIMCC_SPLIT_RATIO}")
        axis = mesh.axis_names[0]
        self._batch = NamedSharding(mesh, P(axis))
        repl = NamedSharding(mesh, P())
        platform = mesh.devices.flat[0].platform
        # Winograd for the detector only: it is ~85% of a frame's time, and its outputs moved by float32
        # rounding (3.8e-6 -> 4.6e-6 of their scale against onnxruntime). RTMPose's SimCC logits
        # amplify rounding in its head: on one of four random crops their difference from onnxruntime
        # went from 6.7e-5 to 3.6e-4 of their scale, for a few percent of a frame's time.
        detector = compile_options.prepare(detector, platform, winograd=winograd)
        self.winograd_layers = compile_options.winograd_layers(detector)
        self._det_graph, det_state = nnx.split(detector)
        self._pose_graph, pose_state = nnx.split(pose)
        self._det_state = jax.device_put(det_state, repl)
        self._pose_state = jax.device_put(pose_state, repl)
        self._detect, self._estimate = _compiled(platform)

    def _padded(self, x: np.ndarray) -> np.ndarray:
        pad = self.batch_size - len(x)
        return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x

    def detect_async(self, images: np.ndarray):
        """Dispatches the detector and returns at once; ``np.asarray(result)[:len(images)]`` waits."""
        import jax

        x = jax.device_put(self._padded(images), self._batch)
        return self._detect(self._det_graph, self._batch, self._det_state, x)

    def detect(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.detect_async(images))[: len(images)]

    def estimate(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import jax

        locs, vals = [], []
        for i in range(0, len(crops), self.batch_size):
            chunk = crops[i : i + self.batch_size]
            x = jax.device_put(self._padded(chunk), self._batch)
            lo, va = self._estimate(self._pose_graph, self._batch, self._pose_state, x)
            locs.append(np.asarray(lo)[: len(chunk)])
            vals.append(np.asarray(va)[: len(chunk)])
        return np.concatenate(locs), np.concatenate(vals)


@functools.cache
def _compiled(platform: str = "cpu"):
    """(detect, estimate) jitted for ``platform``, with the pose networks' compiler options there."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from anim_jax.pose import compile_options

    def _jit(fn):
        return compile_options.jit(fn, platform, static_argnums=(0, 1))

    mean = np.asarray(pp.POSE_MEAN, np.float32)
    std = np.asarray(pp.POSE_STD, np.float32)

    @_jit
    def detect(graph, batch, state, images):
        raw = nnx.merge(graph, state)(images[..., ::-1].astype(jnp.float32))
        return jax.lax.with_sharding_constraint(raw[..., :6], batch)

    @_jit
    def estimate(graph, batch, state, crops):
        x = (crops[..., ::-1].astype(jnp.float32) - mean) / std
        sx, sy = nnx.merge(graph, state)(x)
        locs = jnp.stack([jnp.argmax(sx, -1), jnp.argmax(sy, -1)], -1).astype(jnp.float32)
        vals = jnp.minimum(jnp.max(sx, -1), jnp.max(sy, -1))
        return jax.lax.with_sharding_constraint(locs, batch), jax.lax.with_sharding_constraint(vals, batch)

    return detect, estimate


# ----------------------------------------------------------------------------------------------
# The extractor


class PoseExtractor:
    """``PoseExtractor.from_pretrained("weights/dwpose")(video_or_frames) -> Poses``.

    batch_size: frames per device batch (rounded up to a multiple of the device count);
    detect_resolution: Moore's detection resize (shorter side, default 512); None keeps the source size;
    all_persons: keep every detected person (default: Moore's single best person);
    no_person: "empty" (default) or "full_image" (Moore: estimate on the whole frame);
    mesh: a 1-D mesh (default: all local devices); workers: host threads for resizing and cropping;
    detector_input: the letterboxed detector input (h, w), DWPose's 640 x 640 by default;
    winograd: the detector's wide 3x3 convolutions as Winograd convolutions (default: on CPU only;
    see ``anim_jax.pose.winograd``).
    """

    def __init__(
        self,
        detector,
        pose,
        *,
        batch_size: int = 8,
        detect_resolution: int | None = pp.DETECT_RESOLUTION,
        all_persons: bool = False,
        no_person: str = "empty",
        mesh=None,
        detector_input: tuple[int, int] = pp.DETECTOR_INPUT,
        workers: int | None = None,
        networks=None,
        winograd: bool | None = None,
    ):
        if no_person not in NO_PERSON_MODES:
            raise ValueError(f"no_person must be one of {NO_PERSON_MODES}, got {no_person!r}")
        if detect_resolution is not None and detect_resolution < 64:
            raise ValueError(f"detect_resolution must be >= 64 or None, got {detect_resolution}")
        self.networks = networks if networks is not None else DeviceNetworks(
            detector, pose, batch_size=batch_size, mesh=mesh, detector_input=detector_input, winograd=winograd
        )
        self.detect_resolution = detect_resolution
        self.all_persons = all_persons
        self.no_person = no_person
        self.workers = workers or min(8, os.cpu_count() or 1)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> "PoseExtractor":
        """Loads a converted DWPose directory (``anim-jax convert-pose``)."""
        from anim_jax.pose.networks import load_dwpose

        from anim_jax import storage

        if not storage.as_path(directory).is_dir():
            raise PoseInputError(f"pose weights {os.fspath(directory)!r} is not a directory (convert DWPose with anim-jax convert-pose)")
        detector, pose = load_dwpose(directory)
        return cls(detector, pose, **kwargs)

    @property
    def batch_size(self) -> int:
        return self.networks.batch_size

    # -- one video or frame list -------------------------------------------------------------

    def __call__(self, video_or_frames, *, progress: bool = False) -> Poses:
        """Poses of a video file (path) or of frames ((F, H, W, 3) uint8 RGB array or a list of them)."""
        if isinstance(video_or_frames, (str, os.PathLike)):
            return next(iter(self.extract_videos([video_or_frames], progress=progress)))[1]
        frames = video_or_frames
        if isinstance(frames, np.ndarray) and frames.ndim == 3:
            frames = frames[None]
        checked = [pp.check_frame(f, f"frame {i}") for i, f in enumerate(frames)]
        results = list(self.stream(((i, f) for i, f in enumerate(checked)), total=len(checked), progress=progress))
        return stack_poses(results)

    # -- many videos in one pass ---------------------------------------------------------------

    def extract_videos(
        self, paths: Iterable[str | os.PathLike], *, progress: bool = False, skip_errors: bool = False
    ) -> Iterator[tuple[str, "Poses | PoseInputError"]]:
        """(path, Poses) per video, in order; the frames of all videos share device batches.

        An unreadable video (missing, not a video, corrupt, no frames) raises ``PoseInputError``
        naming it; with ``skip_errors`` it is yielded as ``(path, error)`` instead and the rest go on.
        """
        from data_pipelines.video_io import video_info

        paths = [os.fspath(p) for p in paths]
        failed: dict[str, PoseInputError] = {}
        infos: dict[str, dict] = {}

        def frames():
            for p in paths:
                try:
                    with _local_video(p) as local:  # a URL: downloaded while its frames are read
                        infos[p] = _video_info(local, video_info, name=p)
                        n = 0
                        for i, f in enumerate(_iter_frames(local, name=p)):
                            n += 1
                            yield (p, i), f
                    if n == 0:
                        raise PoseInputError(f"{p!r}: the video has no frames")
                except PoseInputError as e:
                    if not skip_errors:
                        raise
                    failed[p] = e

        total = None
        if progress:  # container frame counts, for the bar only (0 when unknown)
            total = sum(_video_info_quiet(p, video_info) for p in paths) or None
        pending = iter(paths)
        bucket: list[FramePoses] = []

        def flush(p):
            if p in failed:
                return p, failed[p]
            return p, stack_poses(bucket, infos[p]["fps"])

        current = next(pending, None)
        for fp in self.stream(frames(), total=total, progress=progress):
            while fp.key[0] != current:
                yield flush(current)
                bucket = []
                current = next(pending)
            bucket.append(fp)
        while current is not None:
            yield flush(current)
            bucket = []
            current = next(pending, None)

    # -- the core -------------------------------------------------------------------------------

    def stream(self, items: Iterable[tuple[Any, np.ndarray]], *, total: int | None = None, progress: bool = False) -> Iterator[FramePoses]:
        """(key, RGB frame) pairs -> ``FramePoses`` in the same order, batched on the device."""
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="poses", unit="frame", disable=not progress)
        missing = 0
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            try:
                prepared = _bounded_map(pool, self._prepare, items, 2 * self.batch_size)
                # One batch in flight: the device detects batch i + 1 while the host decodes, crops
                # and estimates batch i.
                pending = None
                for batch in itertools.chain(_chunks(prepared, self.batch_size), [None]):
                    submitted = None if batch is None else (batch, self._submit(batch))
                    if pending is not None:
                        for result in self._process(*pending, pool):
                            missing += len(result.keypoints) == 0
                            yield result
                        bar.update(len(pending[0]))
                        if missing:
                            bar.set_postfix(no_person=missing)
                    pending = submitted
            finally:
                bar.close()

    def _prepare(self, item) -> _Frame:
        key, frame = item
        frame = pp.check_frame(frame, f"frame {key}")
        detect = pp.resize_for_detection(frame, self.detect_resolution)
        boxed, ratio = pp.letterbox(detect, getattr(self.networks, "detector_input", pp.DETECTOR_INPUT))
        return _Frame(key, frame.shape[:2], detect, boxed, ratio)

    def _submit(self, batch: list[_Frame]):
        images = np.stack([f.letterboxed for f in batch])
        if hasattr(self.networks, "detect_async"):
            return self.networks.detect_async(images)
        return self.networks.detect(images)

    def _process(self, batch: list[_Frame], raw, pool) -> list[FramePoses]:
        raw = np.asarray(raw)[: len(batch)]
        size = getattr(self.networks, "detector_input", pp.DETECTOR_INPUT)
        boxes = [pp.decode_detections(r, f.ratio, size) for r, f in zip(raw, batch)]
        if self.no_person == "full_image":
            boxes = [b if len(b) else pp.full_image_box(*f.detect.shape[:2]) for b, f in zip(boxes, batch)]
        owners = [i for i, b in enumerate(boxes) for _ in range(len(b))]
        all_boxes = np.concatenate([b for b in boxes if len(b)]) if owners else np.zeros((0, 4))
        size = self.networks.pose_input
        center, scale = pp.crop_transforms(all_boxes, size)
        crops = list(pool.map(lambda j: pp.crop_person(batch[owners[j]].detect, center[j], scale[j], size), range(len(owners))))
        if crops:
            locs, vals = self.networks.estimate(np.stack(crops))
            kps, scores = pp.keypoints_from_simcc(locs, vals, center, scale, size)
        out = []
        for i, f in enumerate(batch):
            mine = [j for j, o in enumerate(owners) if o == i]
            kp = kps[mine] if mine else np.zeros((0, 133, 2))
            sc = scores[mine] if mine else np.zeros((0, 133), np.float32)
            if len(kp) > 1 and not self.all_persons:
                best = pp.select_person(kp, sc)
                kp, sc = kp[best : best + 1], sc[best : best + 1]
            dh, dw = f.detect.shape[:2]
            h, w = f.image_size
            src = kp.copy()
            src[..., 0] = kp[..., 0] / float(dw) * float(w)
            src[..., 1] = kp[..., 1] / float(dh) * float(h)
            out.append(FramePoses(f.key, src, sc.astype(np.float32), (h, w), (dh, dw)))
        return out


def _bounded_map(pool, fn, items: Iterable, ahead: int) -> Iterator:
    """``pool.map`` that reads at most ``ahead`` items ahead (``Executor.map`` reads its whole input,
    which would decode every video of a dataset into memory at once)."""
    queue: collections.deque = collections.deque()
    for x in items:
        queue.append(pool.submit(fn, x))
        if len(queue) >= ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def _local_video(path: str):
    """``path`` itself, or for a URL a temporary local copy (PyAV decodes local files)."""
    from anim_jax import storage

    if not storage.is_url(path):
        yield path
        return
    try:
        exists = storage.as_path(path).is_file()
    except OSError as e:  # an unreachable bucket, missing credentials
        raise PoseInputError(f"{path!r}: cannot be read ({type(e).__name__}: {e})") from None
    if not exists:
        raise PoseInputError(f"{path!r}: no such video file")
    with storage.local_copy(path) as local:
        yield str(local)


def _video_info(path: str, video_info: Callable, *, name: str | None = None) -> dict:
    name = path if name is None else name
    if not os.path.isfile(path):
        raise PoseInputError(f"{name!r}: no such video file")
    try:
        return video_info(path)
    except Exception as e:  # noqa: BLE001  (PyAV raises many types for files it cannot read)
        raise PoseInputError(f"{name!r} is not a readable video: {type(e).__name__}: {e}") from e


def _video_info_quiet(path: str, video_info: Callable) -> int:
    from anim_jax import storage

    if storage.is_url(path):
        return 0  # unknown until downloaded (the bar only)
    try:
        return int(video_info(path)["num_frames"])
    except Exception:  # noqa: BLE001  (reported when the video is reached)
        return 0


def _iter_frames(path: str, *, name: str | None = None) -> Iterator[np.ndarray]:
    from data_pipelines.video_io import iter_video_frames

    try:
        yield from iter_video_frames(path)
    except Exception as e:  # noqa: BLE001
        raise PoseInputError(f"{path if name is None else name!r} is not a readable video: {type(e).__name__}: {e}") from e


def extract(frames, *, weights: str | os.PathLike | None = None, extractor: PoseExtractor | None = None, **kwargs) -> Poses:
    """``anim_jax.pose.extract(frames, weights="weights/dwpose")``: poses of a video path or frames."""
    if extractor is None:
        if weights is None:
            raise ValueError("extract() needs weights= (a converted DWPose directory) or extractor=")
        extractor = PoseExtractor.from_pretrained(weights, **kwargs)
    return extractor(frames)
