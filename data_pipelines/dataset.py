"""The anim_jax video dataset: a TFDS ArrayRecord dataset, built and read without TensorFlow.

One record per video::

    id          str    the video's relative path without extension (unique)
    frames      [T] bytes   JPEG, one per frame (RGB)
    poses       [T] bytes   PNG (lossless), one per frame (the rendered skeleton, RGB)
    num_frames  int32  T (>= 1); frames and poses always have the same length
    fps         float32
    height, width            int32  frame size
    pose_height, pose_width  int32  pose-frame size (may differ from the frame size, as DWPose renders
                                    at its detection size; the Grain pipeline resizes poses to the frame)

The features are ``Tensor``/``Sequence``/``Text`` only: ``tfds.features.Image`` from arrays and
``tfds.features.Video`` need TensorFlow (research/env.md section 7). Frames are encoded by us (PIL) and
stored as bytes, so any frame can be decoded without touching the others.

Writing: ``build_dataset(path, examples)`` runs ``AnimVideoDataset.download_and_prepare`` in a temporary
sibling directory and renames the finished version directory to ``path`` at the very end, so a crash
never leaves a directory at ``path`` (nothing there reads as a complete dataset). A URL ``path``
(``gs://bucket/data/ubc``) is built in a local temporary directory (ArrayRecord's writer cannot create
objects) and uploaded shard by shard with ``dataset_info.json`` last: that file is the dataset's
commit marker (object stores have no rename), so an interrupted upload never reads as complete.
Reading: ``open_dataset(path)`` -> a random-access source (``len``, ``src[i]`` -> dict of numpy values),
which Grain consumes directly (``grain.MapDataset.source``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from anim_jax import atomic, storage

DATASET_NAME = "anim_video"
VERSION = "1.0.0"
SPLIT = "train"
REPORT_NAME = "prepare_report.json"


def features(keypoints: bool = False) -> tfds.features.FeaturesDict:
    """The record format; ``keypoints`` adds the extracted poses (``anim-jax prepare --extract-poses``):
    the bytes of an ``anim_jax.pose.extract.Poses.save`` .npz, so a change of rendering needs no
    re-extraction."""
    encoded = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
    scalar = lambda dt: tfds.features.Scalar(dtype=dt)  # noqa: E731
    extra = {"keypoints": tfds.features.Tensor(shape=(), dtype=np.object_)} if keypoints else {}
    return tfds.features.FeaturesDict(
        {
            **extra,
            "id": tfds.features.Text(),
            "frames": encoded,
            "poses": encoded,
            "num_frames": scalar(np.int32),
            "fps": scalar(np.float32),
            "height": scalar(np.int32),
            "width": scalar(np.int32),
            "pose_height": scalar(np.int32),
            "pose_width": scalar(np.int32),
        }
    )


class AnimVideoDataset(tfds.core.GeneratorBasedBuilder):
    """TFDS builder fed by an iterable of ready example dicts (see the module docstring).

    Only the writer needs this class: readers use ``tfds.builder_from_directory`` (``open_dataset``),
    which rebuilds the features from ``features.json``.
    """

    name = DATASET_NAME
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Per-frame JPEG frames, PNG poses, fps, frame count, id."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup goes through `importlib_resources`, which is not a dependency of ours
        # (nor of tfds); the answer is simply this file.
        return epath.Path(__file__)

    def __init__(self, *, examples: Iterable[Mapping] | None = None, description: str = "", keypoints: bool = False, **kwargs):
        self._examples = examples
        self._description = description
        self._keypoints = keypoints
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self) rather than dataset_info_from_configs: the latter looks for
        # metadata files next to the builder's code (research/env.md section 7).
        return _LocalDatasetInfo(
            builder=self,
            description=self._description or "Videos with rendered pose videos for Animate Anyone training.",
            features=features(self._keypoints),
        )

    # TFDS announces the (temporary) build directory as the dataset's home; build_dataset reports
    # the real place instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        del dl_manager
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        if self._examples is None:
            raise ValueError("AnimVideoDataset was created without examples: nothing to write")
        for ex in self._examples:
            yield ex["id"], dict(ex)


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    def initialize_from_bucket(self) -> None:
        """Never look for published metadata on gs://tfds-data (TFDS leaves an empty temp dir behind)."""


def make_example(
    id: str,
    frames: list[bytes],
    poses: list[bytes],
    fps: float,
    size: tuple[int, int],
    pose_size: tuple[int, int],
) -> dict:
    """A record in the dataset's format; ``size``/``pose_size`` are (height, width)."""
    if len(frames) != len(poses) or not frames:
        raise ValueError(f"{id}: {len(frames)} frames vs {len(poses)} poses")
    return {
        "id": id,
        "frames": list(frames),
        "poses": list(poses),
        "num_frames": len(frames),
        "fps": float(fps),
        "height": int(size[0]),
        "width": int(size[1]),
        "pose_height": int(pose_size[0]),
        "pose_width": int(pose_size[1]),
    }


def build_dataset(
    path: str | os.PathLike,
    examples: Iterable[Mapping],
    *,
    report: Mapping | None = None,
    overwrite: bool = False,
    description: str = "",
    keypoints: bool = False,
) -> str:
    """Writes ``examples`` as a dataset at ``path`` (a new directory), atomically.

    The build runs in ``<path>.incomplete-<random>`` next to ``path``; only when TFDS has finished
    (records, ``dataset_info.json``, ``features.json``) is the version directory renamed to ``path``.
    ``report`` (if given) is read *after* ``examples`` is exhausted and written as
    ``<path>/prepare_report.json`` before the rename. With ``overwrite`` an existing ``path`` is
    replaced only once the new dataset is complete. Returns ``path``.
    """
    remote = storage.is_url(path)
    path = str(storage.absolute(path))
    if storage.as_path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if remote:
        storage.check_bucket(path, "dataset")
        parent = None  # built in the system's temporary folder, then uploaded
    else:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
    tfds.disable_progress_bar()  # the caller shows its own progress
    tmp = tempfile.mkdtemp(prefix=storage.as_path(path).name + ".incomplete-", dir=parent)
    try:
        builder = AnimVideoDataset(examples=examples, description=description, keypoints=keypoints, data_dir=tmp)
        builder.download_and_prepare(
            download_dir=os.path.join(tmp, "downloads"),
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
            ),
        )
        built = os.path.join(tmp, DATASET_NAME, VERSION)
        if report is not None:
            write_json(os.path.join(built, REPORT_NAME), report)
        atomic.replace_dir(built, path)  # an existing dataset (overwrite) is swapped out, then removed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def write_json(path: str | os.PathLike, obj) -> None:
    """JSON file written atomically (temporary file + rename)."""
    with atomic.atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a finished dataset (TFDS writes dataset_info.json last; an upload
    to an object store too)."""
    return (storage.as_path(path) / "dataset_info.json").is_file()


def open_dataset(path: str | os.PathLike, split: str = SPLIT):
    """Random-access source over a built dataset: ``len(src)``, ``src[i]`` -> dict of numpy values.

    ``frames``/``poses`` come back as object arrays of encoded bytes; decode with
    ``video_io.decode_image``. Picklable, so it can go to Grain worker processes.
    """
    path = str(storage.as_path(path))  # gs:// is read directly (TFDS via epath, ArrayRecord's own GCS reader)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: no complete anim_jax dataset there (missing dataset_info.json)")
    return tfds.builder_from_directory(path).as_data_source(split=split)


def read_report(path: str | os.PathLike) -> dict | None:
    p = storage.as_path(path) / REPORT_NAME
    if not p.is_file():
        return None
    return json.loads(p.read_text())
