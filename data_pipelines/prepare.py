"""``anim-jax prepare``: videos + pose videos -> the TFDS ArrayRecord dataset of ``dataset.py``.

Inputs, in Moore-AnimateAnyone's layouts (research/moore.md section 5.1):
* a folder ``ROOT`` of videos (searched recursively) with pose videos at the same relative paths
  under ``ROOT_dwpose`` (what ``tools/extract_dwpose_from_vid.py`` writes);
* or a meta JSON file, a list of ``{"video_path": ..., "kps_path": ...}`` (``tools/extract_meta_info.py``).

Per video, worker processes decode both videos with PyAV and encode every frame (JPEG for frames,
PNG for poses); with ``resize`` the frames' shorter side becomes ``resize`` (bicubic) and the pose frames
are resized to the resized frame size (bilinear). Videos that cannot be used never stop the run:
unreadable or corrupt files, missing pose videos, empty videos, and video/pose frame-count
mismatches are skipped (mismatches are cut to the common length instead with
``on_mismatch="truncate"``); every one is listed in the report, which is printed at the end and
written as JSON into the dataset (``prepare_report.json``) and to ``report_path`` if given.
The dataset is written atomically (``dataset.build_dataset``).

From raw videos (``extract_poses=True``, ``anim-jax prepare ROOT --extract-poses --pose-weights DIR``):
no ``ROOT_dwpose`` is needed. DWPose runs first, on the device mesh (frames of all videos share
sharded batches; in a multi-process run each process takes every N-th video), and leaves one keypoint
file per video in ``OUTPUT.poses/`` (written atomically, so a rerun after an interruption extracts only
the videos not done yet); the records are then written as usual, the pose frames rendered from those
keypoints exactly as Moore renders its training poses (detection size, ``anim_jax.pose.render``) and
stored as PNG, the keypoints themselves stored with each record (``keypoints``), so a change of
rendering needs no re-extraction. ``OUTPUT.poses/`` is removed once the dataset is complete. In a
multi-process run the first process writes the dataset (it reads every process's keypoint files, so
``OUTPUT``'s folder must be shared, as a bucket is) and the others wait until it is written.

The report's ``stage_s`` says where the time went (seconds per stage, see ``prepare``);
``benchmarks/prepare.py`` reads it.

URLs (``gs://bucket/...``): a source folder (with its ``_dwpose`` sibling) is downloaded to a local
temporary folder first (decoders need local files, and every frame is read anyway); a meta JSON (local
or a URL) may list URLs (or paths relative to a JSON in a bucket), each video and pose video then
downloaded while it is processed. The output is built locally and uploaded with its commit marker
last (``dataset.build_dataset``); with ``extract_poses`` its keypoint files wait in ``OUTPUT.poses/``
in the bucket.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from anim_jax import storage
from data_pipelines import dataset as dataset_lib
from data_pipelines.video_io import (
    JPEG_SUBSAMPLING,
    VIDEO_EXTENSIONS,
    EmptyVideoError,
    encode_jpeg,
    encode_png,
    iter_video_frames,
    video_info,
)


@dataclasses.dataclass(frozen=True)
class VideoTask:
    id: str
    video_path: str
    kps_path: str


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    resize: int | None = None  # shorter side of the stored frames; None keeps the source size
    jpeg_quality: int = 95
    jpeg_subsampling: str = "444"  # "444" | "422" | "420"
    on_mismatch: str = "skip"  # "skip" | "truncate"
    min_frames: int = 1

    def __post_init__(self):
        if self.on_mismatch not in ("skip", "truncate"):
            raise ValueError(f"on_mismatch must be 'skip' or 'truncate', got {self.on_mismatch!r}")
        if self.jpeg_subsampling not in JPEG_SUBSAMPLING:
            raise ValueError(f"jpeg_subsampling must be one of {sorted(JPEG_SUBSAMPLING)}, got {self.jpeg_subsampling!r}")


KEYPOINTS_SUFFIX = ".npz"  # a VideoTask whose kps_path ends so holds extracted keypoints, not a pose video


# ----------------------------------------------------------------------------------------------
# Finding the inputs


def find_raw_videos(root: str | os.PathLike) -> list[VideoTask]:
    """``ROOT/**/x.mp4`` without pose videos (for ``extract_poses``); ``kps_path`` is filled in later."""
    root = os.path.abspath(os.fspath(root)).rstrip("/")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    tasks = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(VIDEO_EXTENSIONS):
                video = os.path.join(dirpath, name)
                tasks.append(VideoTask(_strip_ext(os.path.relpath(video, root)).replace(os.sep, "/"), video, ""))
    return tasks


def _strip_ext(p: str) -> str:
    return os.path.splitext(p)[0]


def find_videos(root: str | os.PathLike) -> tuple[list[VideoTask], list[dict]]:
    """``ROOT/**/x.mp4`` with ``ROOT_dwpose/**/x.mp4``. Returns (tasks, problems) where problems are
    videos without a pose video (same relative path; any video extension is accepted for the pose)."""
    root = os.path.abspath(os.fspath(root)).rstrip("/")
    pose_root = root + "_dwpose"
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    tasks, problems = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(VIDEO_EXTENSIONS):
                continue
            video = os.path.join(dirpath, name)
            rel = os.path.relpath(video, root)
            vid = _strip_ext(rel).replace(os.sep, "/")
            kps = os.path.join(pose_root, rel)
            if not os.path.isfile(kps):
                alternatives = [_strip_ext(kps) + ext for ext in VIDEO_EXTENSIONS if os.path.isfile(_strip_ext(kps) + ext)]
                if not alternatives:
                    problems.append({"id": vid, "video_path": video, "kps_path": kps, "reason": "missing pose video"})
                    continue
                kps = alternatives[0]
            tasks.append(VideoTask(vid, video, kps))
    return tasks, problems


def read_meta(meta_path: str | os.PathLike) -> list[VideoTask]:
    """A meta JSON list of ``{"video_path", "kps_path"}``; ids are the video paths relative to their
    common directory, without extension (made unique with ``#k`` suffixes)."""
    try:
        items = json.loads(storage.as_path(meta_path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from e
    if not isinstance(items, list):
        raise ValueError(f"{meta_path}: expected a JSON list of {{'video_path', 'kps_path'}}")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not all(isinstance(it.get(k), str) for k in ("video_path", "kps_path")):
            raise ValueError(f"{meta_path}: item {i} must be an object with string 'video_path' and 'kps_path', got {it!r}")
    base = str(meta_path).rsplit("/", 1)[0] if storage.is_url(meta_path) else os.path.dirname(os.fspath(meta_path))
    paths = [(_meta_entry(base, it["video_path"]), _meta_entry(base, it["kps_path"])) for it in items]
    if not paths:
        return []
    common = os.path.commonpath([os.path.dirname(_id_path(v)) for v, _ in paths])
    return [VideoTask(_strip_ext(os.path.relpath(_id_path(v), common)).replace(os.sep, "/"), v, k) for v, k in paths]


def _meta_entry(base: str, path: str) -> str:
    """A meta JSON entry: a URL or an absolute path as is, a relative path joined to the JSON's folder
    (a URL folder for a JSON in a bucket)."""
    if storage.is_url(path) or os.path.isabs(path):
        return path
    return f"{base}/{path}" if storage.is_url(base) else os.path.join(base, path)


def _id_path(path: str) -> str:
    """An absolute path standing for ``path`` when ids are made: ``gs://b/x.mp4`` -> ``/gs/b/x.mp4``
    (so URLs and local paths share one tree and ids do not depend on the scheme's ``//``)."""
    if storage.is_url(path):
        scheme, _, rest = path.partition("://")
        return f"/{scheme}/{rest}"
    return os.path.abspath(path)


def collect_tasks(sources: Sequence[str | os.PathLike]) -> tuple[list[VideoTask], list[dict]]:
    """Tasks from folders and/or meta JSON files, ids made unique across all of them."""
    tasks, problems = [], []
    for src in sources:
        if os.fspath(src).endswith(".json"):
            tasks += read_meta(src)
        else:
            t, p = find_videos(src)
            tasks += t
            problems += p
    return collect_unique(tasks), problems


def collect_unique(tasks: Sequence[VideoTask]) -> list[VideoTask]:
    """Ids made unique with ``#k`` suffixes."""
    seen: dict[str, int] = {}
    unique = []
    for t in tasks:
        k = seen.get(t.id, 0)
        seen[t.id] = k + 1
        unique.append(t if k == 0 else dataclasses.replace(t, id=f"{t.id}#{k + 1}"))
    return unique


# ----------------------------------------------------------------------------------------------
# Where the time goes (``report["stage_s"]``, read by benchmarks/prepare.py)

# Seconds per stage of the video being processed in this process, drained by ``_results`` after each
# video; a module-level tally so that ``process_video(task, options)`` keeps its signature.
_stage_seconds: collections.Counter = collections.Counter()


def _clock(stage: str, t0: float) -> None:
    _stage_seconds[stage] += time.perf_counter() - t0


def _take_stage_seconds() -> dict:
    taken = dict(_stage_seconds)
    _stage_seconds.clear()
    return taken


def _timed(it, stage: str):
    """Yields from ``it``, adding the time spent producing each item to ``stage``."""
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            x = next(it)
        except StopIteration:
            _clock(stage, t0)
            return
        _clock(stage, t0)
        yield x


# ----------------------------------------------------------------------------------------------
# One video (runs in a worker process)


def _resized_size(h: int, w: int, shorter: int | None) -> tuple[int, int]:
    if not shorter or min(h, w) == shorter:
        return h, w
    if h <= w:
        return shorter, max(1, round(w * shorter / h))
    return max(1, round(h * shorter / w)), shorter


def _encode_stream(
    path: str, encode, size: tuple[int, int] | None, resample, stage: str
) -> tuple[list[bytes], tuple[int, int]]:
    """Decodes every frame of ``path``, resizes to ``size`` (h, w) if given (else to the first frame's
    size when a later frame differs) and encodes it. Returns (encoded frames, (h, w)). Decoding is
    timed as stage ``decode``, resizing and encoding as ``stage``."""
    out: list[bytes] = []
    hw = size
    for arr in _timed(iter_video_frames(path), "decode"):
        t0 = time.perf_counter()
        if hw is None:
            hw = arr.shape[:2]
        if arr.shape[:2] != hw:
            arr = np.asarray(Image.fromarray(arr).resize((hw[1], hw[0]), resample))
        out.append(encode(arr))
        _clock(stage, t0)
    return out, (hw or (0, 0))


def _encode_keypoints(path: str, size: tuple[int, int] | None) -> tuple[list[bytes], tuple[int, int], dict]:
    """Pose frames rendered from extracted keypoints as Moore renders them (detection size; resized
    to ``size`` (h, w) bilinear if given, as pose videos are) and PNG-encoded; plus the record's
    ``keypoints`` field."""
    from anim_jax.pose.extract import Poses

    t0 = time.perf_counter()
    poses = Poses.load(path)
    _clock("render", t0)
    out = []
    for arr in _timed(poses.render("detect"), "render"):
        t0 = time.perf_counter()
        if size is not None and arr.shape[:2] != size:
            arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
        out.append(encode_png(arr))
        _clock("encode_poses", t0)
    with open(path, "rb") as f:
        data = f.read()
    return out, (size or tuple(poses.detect_size)), {"keypoints": data}


def process_video(task: VideoTask, options: PrepareOptions) -> tuple[dict | None, dict | None]:
    """``(example, None)`` for a usable video, ``(None, problem)`` for a skipped one; a truncated video
    gives ``(example, note)``. Never raises for a bad input."""

    def problem(reason: str, **extra) -> dict:
        return {"id": task.id, "video_path": task.video_path, "kps_path": task.kps_path, "reason": reason, **extra}

    from_keypoints = task.kps_path.endswith(KEYPOINTS_SUFFIX)
    for p, what in ((task.video_path, "video"), (task.kps_path, "keypoints" if from_keypoints else "pose video")):
        if not storage.as_path(p).is_file():
            return None, problem(f"missing {what}")
    if storage.is_url(task.video_path) or storage.is_url(task.kps_path):
        return _process_remote_video(task, options, problem)
    try:
        info = video_info(task.video_path)
        size = _resized_size(info["height"], info["width"], options.resize) if options.resize else None
        frames, (h, w) = _encode_stream(
            task.video_path,
            lambda a: encode_jpeg(a, options.jpeg_quality, options.jpeg_subsampling),
            size,
            Image.BICUBIC,
            "encode_frames",
        )
    except EmptyVideoError as e:
        return None, problem(f"empty video: {e}")
    except Exception as e:  # noqa: BLE001  (any decoder failure means: skip this video)
        return None, problem(f"unreadable video: {type(e).__name__}: {e}")
    if len(frames) < options.min_frames:
        return None, problem("empty video: no frames" if not frames else f"video has {len(frames)} frames < {options.min_frames}")
    extra = {}
    try:
        if from_keypoints:
            poses, (ph, pw), extra = _encode_keypoints(task.kps_path, (h, w) if options.resize else None)
        else:
            poses, (ph, pw) = _encode_stream(
                task.kps_path, encode_png, (h, w) if options.resize else None, Image.BILINEAR, "encode_poses"
            )
    except EmptyVideoError as e:
        return None, problem(f"empty pose video: {e}")
    except Exception as e:  # noqa: BLE001
        return None, problem(f"unreadable pose video: {type(e).__name__}: {e}")
    if not poses:
        return None, problem("empty pose video: no frames")
    note = None
    if len(frames) != len(poses):
        counts = {"frames": len(frames), "poses": len(poses)}
        if options.on_mismatch == "skip":
            return None, problem("frame-count mismatch", **counts)
        n = min(len(frames), len(poses))
        if n < options.min_frames:
            return None, problem("frame-count mismatch", **counts)
        frames, poses = frames[:n], poses[:n]
        note = problem("frame-count mismatch, truncated", kept=n, **counts)
    return {**dataset_lib.make_example(task.id, frames, poses, info["fps"], (h, w), (ph, pw)), **extra}, note


def _process_remote_video(task: VideoTask, options: PrepareOptions, problem) -> tuple[dict | None, dict | None]:
    """``process_video`` of a task with URL files: each downloaded to a temporary local copy (the
    decoders read local files) for the time of this video only; the report names the URLs."""
    with contextlib.ExitStack() as stack:
        try:
            local = dataclasses.replace(task, video_path=str(stack.enter_context(storage.local_copy(task.video_path))),
                                        kps_path=str(stack.enter_context(storage.local_copy(task.kps_path))))
        except Exception as e:  # noqa: BLE001  (a failed download skips this video, as a bad file does)
            return None, problem(f"download failed: {type(e).__name__}: {e}")
        example, note = process_video(local, options)
    if note is not None:
        note = {**note, "video_path": task.video_path, "kps_path": task.kps_path}
    return example, note


def _work(args):
    task, options = args
    return process_video(task, options), _take_stage_seconds()


# ----------------------------------------------------------------------------------------------
# The job


def _results(tasks: Sequence[VideoTask], options: PrepareOptions, workers: int) -> Iterator[tuple]:
    if workers <= 0:
        _take_stage_seconds()
        for t in tasks:
            result = process_video(t, options)
            yield result, _take_stage_seconds()
        return
    # spawn: the parent may have jax (threads) loaded, which fork would copy in an unsafe state.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap_unordered(_work, [(t, options) for t in tasks], chunksize=1)


class _Collector:
    """Feeds the TFDS writer from the worker results while filling in the report."""

    def __init__(self, tasks, options, workers, report, progress):
        self.tasks, self.options, self.workers = tasks, options, workers
        self.report, self.progress = report, progress
        self.start = time.time()

    def __iter__(self):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self.tasks), desc="prepare", unit="video", disable=not self.progress)
        try:
            for (example, note), seconds in _results(self.tasks, self.options, self.workers):
                bar.update(1)
                stages = self.report["stage_s"]
                for stage, s in seconds.items():
                    stages[stage] = stages.get(stage, 0.0) + s
                if example is None:
                    self.report["skipped"].append(note)
                    bar.set_postfix(skipped=len(self.report["skipped"]))
                    continue
                if note is not None:
                    self.report["truncated"].append(note)
                self.report["num_videos"] += 1
                self.report["num_frames"] += int(example["num_frames"])
                yield example
        finally:
            bar.close()
            self.report["elapsed_s"] = round(time.time() - self.start, 2)
            self.report["stage_s"] = {k: round(v, 3) for k, v in self.report["stage_s"].items()}
        if self.report["num_videos"] == 0:
            raise NoUsableVideos("no usable videos: nothing to write")


class NoUsableVideos(RuntimeError):
    pass


def keypoints_dir(output: str) -> str:
    """Where extracted keypoints wait for the dataset: beside the output, in its bucket for a URL
    (shared by every process of a pod, and kept across an interruption, like a local one)."""
    if storage.is_url(output):
        return str(output).rstrip("/") + ".poses"
    return os.path.abspath(os.fspath(output)) + ".poses"


def extract_keypoints(
    tasks: Sequence[VideoTask],
    cache_dir: str,
    pose_weights: str | os.PathLike,
    *,
    batch_size: int = 8,
    progress: bool = True,
    stage_s: dict | None = None,
    **extractor_options,
) -> tuple[list[VideoTask], list[dict]]:
    """Runs DWPose over the videos that have no keypoint file in ``cache_dir`` yet (this process's
    share of them in a multi-process run) and returns (tasks pointing at their keypoint files,
    problems for the videos that could not be read). ``stage_s``, if given, gets the seconds spent
    loading the networks (``pose_load``), extracting (``pose_extract``: decoding, DWPose's host steps
    and networks, the first batch's compilation) and saving (``pose_save``), and the number of videos
    this process extracted (``poses_extracted``)."""
    from anim_jax.pose.extract import PoseExtractor

    stage_s = {} if stage_s is None else stage_s

    def kp_path(t):
        return os.path.join(cache_dir, t.id + KEYPOINTS_SUFFIX)

    def error_path(t):  # an unreadable video is remembered too, so a rerun does not retry it
        return os.path.join(cache_dir, t.id + ".error")

    def problem(t, reason):
        return {"id": t.id, "video_path": t.video_path, "kps_path": "", "reason": reason}

    index, count = _process_share()
    cached = _files_under(cache_dir)
    todo = [t for t in tasks if kp_path(t) not in cached and error_path(t) not in cached]
    if count > 1:
        # Every process lists the finished videos before any process adds to them: a process that
        # started late would otherwise see a shorter to-do list and take a shifted share of it.
        _barrier("anim-jax prepare: keypoint cache listed")
    mine = todo[index::count]
    stage_s["poses_extracted"] = stage_s.get("poses_extracted", 0) + len(mine)
    if mine:
        t0 = time.perf_counter()
        extractor = PoseExtractor.from_pretrained(pose_weights, batch_size=batch_size, **extractor_options)
        _add_seconds(stage_s, "pose_load", t0)
        by_path: dict[str, list[VideoTask]] = {}
        for t in mine:
            by_path.setdefault(os.fspath(t.video_path), []).append(t)
        t0 = time.perf_counter()
        for path, poses in extractor.extract_videos(list(by_path), progress=progress, skip_errors=True):
            _add_seconds(stage_s, "pose_extract", t0)
            t0 = time.perf_counter()
            for t in by_path[path]:
                if not storage.is_url(cache_dir):  # (an object store has no folders to make)
                    os.makedirs(os.path.dirname(kp_path(t)), exist_ok=True)
                if isinstance(poses, Exception):
                    dataset_lib.write_json(error_path(t), f"unreadable video: {poses}")
                else:
                    poses.save(kp_path(t))
            _add_seconds(stage_s, "pose_save", t0)
            t0 = time.perf_counter()
    if count > 1:
        _barrier("anim-jax prepare: poses extracted")
    done, problems = [], []
    cached = _files_under(cache_dir)  # every process's files, now
    for t in tasks:
        if kp_path(t) in cached:
            done.append(dataclasses.replace(t, kps_path=kp_path(t)))
        else:
            problems.append(problem(t, json.loads(storage.as_path(error_path(t)).read_text())))
    return done, problems


def _files_under(root: str) -> set[str]:
    """Every file under ``root`` (a folder or a URL prefix), in one listing: on an object store one
    request per page of names rather than one per file."""
    if not storage.is_url(root):
        return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache(path)  # other processes may have added files since the last listing
    scheme = root.split("://", 1)[0]
    return {f"{scheme}://{p}" for p in fs.find(path)}


def _add_seconds(stage_s: dict, stage: str, t0: float) -> None:
    stage_s[stage] = stage_s.get(stage, 0.0) + time.perf_counter() - t0


def _process_share() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def prepare(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    resize: int | None = None,
    jpeg_quality: int = 95,
    jpeg_subsampling: str = "444",
    on_mismatch: str = "skip",
    workers: int | None = None,
    overwrite: bool = False,
    report_path: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
    verbose: bool = True,
    extract_poses: bool = False,
    pose_weights: str | os.PathLike | None = None,
    pose_batch_size: int = 8,
    pose_options: dict | None = None,
) -> dict:
    """Builds the dataset at ``output`` from video folders and/or meta JSON files; returns the report.

    ``workers``: processes decoding/encoding videos (default: all CPUs; 0 runs in this process).
    Raises ``NoUsableVideos`` (after printing and writing the report) when no video could be used;
    ``output`` is then left untouched.
    ``extract_poses``: the sources are folders of raw videos; poses come from DWPose (``pose_weights``,
    a converted directory), see the module docstring; ``pose_options``: more ``PoseExtractor`` settings.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for s in sources:
        if storage.is_url(s):
            _check_remote_source(s)
    if any(storage.is_url(s) and not _is_meta(s) for s in sources):
        with tempfile.TemporaryDirectory(prefix="anim-jax-prepare-") as tmp:
            local = [_download_source(s, tmp, with_poses=not extract_poses) for s in sources]
            return prepare(local, output, resize=resize, jpeg_quality=jpeg_quality, jpeg_subsampling=jpeg_subsampling,
                           on_mismatch=on_mismatch, workers=workers, overwrite=overwrite, report_path=report_path,
                           limit=limit, progress=progress, verbose=verbose, extract_poses=extract_poses,
                           pose_weights=pose_weights, pose_batch_size=pose_batch_size, pose_options=pose_options)
    options = PrepareOptions(
        resize=resize, jpeg_quality=jpeg_quality, jpeg_subsampling=jpeg_subsampling, on_mismatch=on_mismatch
    )
    remote = storage.is_url(output)
    output = str(storage.absolute(output))
    if storage.as_path(output).exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    if remote:
        storage.check_bucket(output, "output")
    parent, base = os.path.split(output)
    stale = sorted(p for p in os.listdir(parent) if p.startswith(base + ".incomplete-")) \
        if not remote and os.path.isdir(parent) else []
    if stale and verbose:
        print(f"prepare: found {len(stale)} unfinished build(s) next to {output} ({', '.join(stale)}); they are "
              "left over from interrupted runs (or belong to one still running) and can be deleted", file=sys.stderr)  # fmt: skip
    if extract_poses:
        if pose_weights is not None and storage.is_url(pose_weights):
            storage.check_bucket(pose_weights, "pose weights")
        if pose_weights is None or not storage.as_path(pose_weights).is_dir():
            raise FileNotFoundError(f"pose weights {os.fspath(pose_weights) if pose_weights else None!r}: not a directory "
                                    "(convert DWPose with anim-jax convert-pose)")  # fmt: skip
        bad = [os.fspath(s) for s in sources if not os.path.isdir(s)]
        if bad:
            raise ValueError(f"--extract-poses takes folders of videos; not a folder: {', '.join(bad)}")
        tasks, problems = [t for s in sources for t in find_raw_videos(s)], []
        tasks = collect_unique(tasks)
    else:
        tasks, problems = collect_tasks(sources)
    if limit is not None:
        tasks = tasks[:limit]
    stage_s: dict = {}
    process_index, process_count, extracted = 0, 1, 0
    if extract_poses:
        tasks, extract_problems = extract_keypoints(tasks, keypoints_dir(output), pose_weights, batch_size=pose_batch_size,
                                                    progress=progress, stage_s=stage_s, **(pose_options or {}))  # fmt: skip
        extracted = stage_s.pop("poses_extracted")
        problems = problems + extract_problems
        process_index, process_count = _process_share()
        if process_index != 0:
            # The first process writes the dataset. The others wait for it: a process that leaves a
            # jax.distributed run early is reported to the rest as failed, which would stop the writer.
            _barrier(_DATASET_WRITTEN)
            return {"output": output, "num_videos": 0, "skipped": problems, "poses_extracted": extracted, "stage_s": stage_s}
    if workers is None:
        workers = os.cpu_count() or 1
    workers = min(workers, len(tasks))
    report = {
        "output": output,
        "sources": [os.fspath(s) for s in sources],
        "options": dataclasses.asdict(options),
        "num_inputs": len(tasks) + len(problems),
        "num_videos": 0,
        "num_frames": 0,
        "skipped": list(problems),
        "truncated": [],
        # Seconds per stage, summed over videos (over worker processes too, so the sum can exceed
        # the elapsed time): pose_* (extraction, this process), decode, encode_frames, render, encode_poses.
        "stage_s": stage_s,
    }
    if extract_poses:
        report["poses_extracted"] = extracted
    collector = _Collector(tasks, options, workers, report, progress)
    try:
        try:
            dataset_lib.build_dataset(output, collector, report=report, overwrite=overwrite,
                                      description=f"prepared from {report['sources']}", keypoints=extract_poses)  # fmt: skip
        except NoUsableVideos:
            _finish_report(report, report_path or output + "." + dataset_lib.REPORT_NAME, verbose)
            raise
        if extract_poses:  # now stored in the records
            if remote:
                storage.remove_tree(keypoints_dir(output))
            else:
                shutil.rmtree(keypoints_dir(output), ignore_errors=True)
    finally:
        if process_count > 1:
            _barrier(_DATASET_WRITTEN)
    _finish_report(report, report_path, verbose)
    return report


_DATASET_WRITTEN = "anim-jax prepare: dataset written"


def _is_meta(source) -> bool:
    return os.fspath(source).endswith(".json")


def _check_remote_source(source) -> None:
    storage.check_bucket(source, "source")  # network and credential failures: one line, not a traceback
    if not storage.as_path(source).exists():
        raise FileNotFoundError(f"{source}: no such file or folder")


def _download_source(source, tmp: str, *, with_poses: bool) -> str:
    """A local copy of one source folder (with its ``_dwpose`` sibling). A meta JSON is read where it
    is: its videos are downloaded one at a time as they are processed (``process_video``)."""
    if not storage.is_url(source) or _is_meta(source):
        return os.fspath(source)
    path = storage.as_path(source)
    folder = os.path.join(tmp, str(len(os.listdir(tmp))))
    os.makedirs(folder)
    local = os.path.join(folder, path.name)
    print(f"prepare: downloading {source} ...", file=sys.stderr)
    storage.download(source, local)
    poses = storage.as_path(str(path) + "_dwpose")
    if with_poses and path.is_dir() and poses.is_dir():
        storage.download(str(poses), local + "_dwpose")
    return local


def _finish_report(report: dict, path, verbose: bool) -> None:
    if path:
        dataset_lib.write_json(path, report)
    if verbose:
        print(format_report(report), file=sys.stderr if report["num_videos"] == 0 else sys.stdout)


def format_report(report: dict) -> str:
    lines = [
        f"prepare: {report['num_videos']} of {report['num_inputs']} videos written "
        f"({report['num_frames']} frames) to {report['output']}"
        + (f" in {report['elapsed_s']} s" if "elapsed_s" in report else "")
    ]
    if report["truncated"]:
        lines.append(f"truncated to the common frame count ({len(report['truncated'])}):")
        lines += [f"  {t['id']}: {t['frames']} frames, {t['poses']} poses -> {t['kept']}" for t in report["truncated"]]
    if report["skipped"]:
        lines.append(f"skipped ({len(report['skipped'])}):")
        for s in report["skipped"]:
            counts = f" ({s['frames']} frames, {s['poses']} poses)" if "frames" in s else ""
            lines.append(f"  {s['id']}: {s['reason']}{counts}  [{s['video_path']}]")
    return "\n".join(lines)
