"""Grain pipelines (the MapDataset API) for stage-1 and stage-2 training.

Element format (numpy, channels-last); batches add a leading batch axis:

* stage 1: ``target`` (H,W,3) float32 in [-1,1]; ``pose`` (H,W,3) float32 in [0,1]; ``reference``
  (H,W,3) float32 in [-1,1]; ``clip`` (S,S,3) uint8; ``index`` int (the record index in the dataset).
* stage 2: ``frames`` (F,H,W,3) float32 in [-1,1]; ``poses`` (F,H,W,3) float32 in [0,1];
  ``reference`` (H,W,3) float32 in [-1,1]; ``clip`` (S,S,3) uint8; ``index`` int.

(H, W) is ``resolution``, S is ``clip_size``, F is ``n_frames``. With ``uint8_output`` the images
stay uint8 (4x fewer bytes out of the workers) and ``normalize_batch`` -- numpy or jax, e.g. inside
the jitted step -- turns them into exactly the float format above.

Sampling follows Moore-AnimateAnyone (research/moore.md section 5.2):

* stage 1: a random reference frame r; the target >= ``sample_margin`` frames after r if the video
  allows, else >= margin before it, else anywhere (the margin is first cut to the video length, as
  Moore does). The same RandomResizedCrop (``crop_scale`` (0.9,1.0), ``crop_ratio`` (0.9,1.0), bilinear)
  on target, pose and reference.
* stage 2: ``n_frames`` indices ``linspace``d over a window of ``(n_frames-1)*sample_rate+1`` frames (the
  whole video if shorter) at a random start, so consecutive frames are ``sample_rate`` apart whenever the
  video is long enough; a reference frame anywhere in the video (it may lie inside the clip).
  **One crop per clip** (``crop_scale`` (1,1), ``crop_ratio`` (0.9,1)), shared by the frames, the poses and
  the reference. Moore draws a fresh crop for every frame; with scale (1,1) no random crop can ever fit,
  so every draw takes RandomResizedCrop's deterministic centre-crop fallback and all of Moore's frames
  get the same crop anyway. One crop per clip gives the same result there and keeps the clip
  spatially consistent for any other scale.
* the CLIP input is the *uncropped* reference frame as Moore's training does with CLIPImageProcessor:
  shorter side -> ``clip_size`` (bicubic), then a centre crop of ``clip_size``; uint8 (the model
  normalises).
* pose frames whose size differs from the video's (DWPose renders at its own detection size) are
  first resized (bilinear) to the frame size, so the crop covers the same region of both.
* ``resolution`` is (height, width); Moore passes (width, height) where torchvision wants (h, w)
  (moore.md issue #154), which only matters for non-square sizes.

Randomness: every element draws from ``np.random.default_rng((seed, epoch, record_index))``, so any
element can be recomputed on its own, in any worker, and the iterator state is just a position.
Order: a global shuffle of the records, reshuffled each epoch (Grain's index shuffle), repeated
``num_epochs`` times (None: forever), then split across hosts by position: host ``i`` of ``n`` takes
positions ``i, i+n, ...``. Each epoch drops ``len % n`` records (a different few every epoch) so all
hosts see the same number of elements per epoch and together cover the epoch exactly once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from data_pipelines.video_io import decode_pil

STAGE1_CROP_SCALE = (0.9, 1.0)
STAGE2_CROP_SCALE = (1.0, 1.0)


@dataclasses.dataclass
class DataConfig:
    """Pipeline settings; plain values, so ``dataclasses.asdict`` gives an ml_collections-ready dict."""

    path: str = ""  # dataset directory written by `anim-jax prepare`
    stage: int = 1
    resolution: tuple[int, int] = (512, 512)  # (height, width) of the crops
    sample_margin: int = 30  # stage 1: min distance between reference and target frame
    n_frames: int = 24  # stage 2: frames per clip
    sample_rate: int = 4  # stage 2: stride between clip frames
    crop_scale: tuple[float, float] | None = None  # None: (0.9, 1.0) for stage 1, (1.0, 1.0) for stage 2
    crop_ratio: tuple[float, float] = (0.9, 1.0)  # width / height
    clip_size: int = 224  # CLIP image-encoder input size
    seed: int = 0
    batch_size: int = 8  # global batch size, over all hosts
    num_epochs: int | None = None  # None: repeat forever
    num_workers: int = 0  # Grain worker processes (mp_prefetch); 0: decode in this process
    read_threads: int = 1  # threads per process computing batches (to_iter_dataset ReadOptions)
    prefetch: int = 2  # batches buffered per worker (or per reader when num_workers == 0)
    # Emit the images as uint8 and leave the float conversion to `normalize_batch` (on device):
    # a quarter of the bytes to move out of the workers, about twice the clips per worker CPU-second
    # (benchmarks/RESULTS.md). Recommended for training; False keeps the float32 format.
    uint8_output: bool = False

    def __post_init__(self):
        if isinstance(self.resolution, int):
            self.resolution = (self.resolution, self.resolution)
        self.resolution = tuple(int(x) for x in self.resolution)
        if self.crop_scale is None:
            self.crop_scale = STAGE1_CROP_SCALE if self.stage == 1 else STAGE2_CROP_SCALE
        self.crop_scale = tuple(float(x) for x in self.crop_scale)
        self.crop_ratio = tuple(float(x) for x in self.crop_ratio)
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def data_config(cfg: DataConfig | Mapping[str, Any] | Any = None, **overrides) -> DataConfig:
    """A ``DataConfig`` from a DataConfig, a dict or an ``ml_collections.ConfigDict`` (unknown keys ignored)."""
    if cfg is None:
        values = {}
    elif isinstance(cfg, DataConfig):
        values = cfg.to_dict()
    else:
        values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in values.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Sampling primitives (numpy + PIL)


def random_resized_crop_params(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: Sequence[float] = STAGE1_CROP_SCALE,
    ratio: Sequence[float] = (0.9, 1.0),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of the crop.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect (w/h) in ``ratio``; when
    none fits, the centre crop of the whole image clamped to the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(im: Image.Image, crop: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crops ``(top, left, h, w)`` and resizes to ``size`` (height, width), bilinear; uint8 HWC."""
    top, left, h, w = crop
    out_h, out_w = size
    if (h, w) == (out_h, out_w) and (top, left) == (0, 0) and im.size == (w, h):
        return np.asarray(im)
    return np.asarray(im.resize((out_w, out_h), Image.BILINEAR, box=(left, top, left + w, top + h)))


def clip_input(im: Image.Image, size: int) -> np.ndarray:
    """CLIPImageProcessor's geometry: shorter side -> ``size`` (bicubic), centre crop ``size``; uint8."""
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def stage1_indices(rng: np.random.Generator, num_frames: int, margin: int) -> tuple[int, int]:
    """Moore's stage-1 (reference, target) frame indices."""
    margin = min(margin, num_frames)
    ref = int(rng.integers(0, num_frames - 1, endpoint=True))
    if ref + margin < num_frames:
        tgt = int(rng.integers(ref + margin, num_frames - 1, endpoint=True))
    elif ref - margin > 0:
        tgt = int(rng.integers(0, ref - margin, endpoint=True))
    else:
        tgt = int(rng.integers(0, num_frames - 1, endpoint=True))
    return ref, tgt


def stage2_indices(rng: np.random.Generator, num_frames: int, n_frames: int, sample_rate: int) -> tuple[list[int], int]:
    """Moore's stage-2 clip frame indices and reference index."""
    clip_length = min(num_frames, (n_frames - 1) * sample_rate + 1)
    start = int(rng.integers(0, num_frames - clip_length, endpoint=True))
    idx = np.linspace(start, start + clip_length - 1, n_frames, dtype=int).tolist()
    ref = int(rng.integers(0, num_frames - 1, endpoint=True))
    return idx, ref


SIGNED_KEYS = ("target", "reference", "frames")  # images the model sees in [-1, 1]
UNIT_KEYS = ("pose", "poses")  # pose images in [0, 1]


def _to_signed(x):
    """uint8 -> float32 in [-1, 1] (numpy or jax arrays)."""
    if isinstance(x, np.ndarray):  # two passes over the data instead of three
        out = np.multiply(x, np.float32(2.0 / 255.0), dtype=np.float32)
        out -= np.float32(1.0)
        return out
    return x.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def _to_unit(x):
    """uint8 -> float32 in [0, 1] (numpy or jax arrays)."""
    if isinstance(x, np.ndarray):
        return np.multiply(x, np.float32(1.0 / 255.0), dtype=np.float32)
    return x.astype(np.float32) * np.float32(1.0 / 255.0)


def normalize_batch(batch: Mapping[str, Any]) -> dict:
    """uint8 images of a ``uint8_output`` element/batch -> the float32 format (others pass through).

    Works on numpy and on jax arrays, so it can run inside the jitted step, after the transfer.
    """
    out = dict(batch)
    for keys, fn in ((SIGNED_KEYS, _to_signed), (UNIT_KEYS, _to_unit)):
        for k in keys:
            if k in out and out[k].dtype == np.uint8:
                out[k] = fn(out[k])
    return out


def element_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), int(epoch), int(index)))


class Sampler:
    """Record + (epoch, index) -> one training element. Picklable (goes to the Grain workers).

    ``raw=True`` always returns uint8 images (the pipeline converts to float32 while batching, which
    saves a full pass over the clip).
    """

    def __init__(self, config: DataConfig, source, raw: bool = False):
        self.config = config
        self.source = source
        self.raw = raw

    def _frame(self, record, i: int) -> Image.Image:
        return decode_pil(record["frames"][i])

    def _pose(self, record, i: int, size: tuple[int, int]) -> Image.Image:
        im = decode_pil(record["poses"][i])
        return im if im.size == size else im.resize(size, Image.BILINEAR)

    def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        epoch, index = item
        record = self.source[index]
        return self.sample(record, element_rng(self.config.seed, epoch, index), index)

    def sample(self, record: Mapping, rng: np.random.Generator, index: int = 0) -> dict[str, np.ndarray]:
        c = self.config
        n = int(record["num_frames"])
        size = (int(record["width"]), int(record["height"]))  # PIL order
        if c.stage == 1:
            ref_i, tgt_i = stage1_indices(rng, n, c.sample_margin)
            ref = self._frame(record, ref_i)
            crop = random_resized_crop_params(rng, size[1], size[0], c.crop_scale, c.crop_ratio)
            element = {
                "target": crop_resize(self._frame(record, tgt_i), crop, c.resolution),
                "pose": crop_resize(self._pose(record, tgt_i, size), crop, c.resolution),
                "reference": crop_resize(ref, crop, c.resolution),
            }
        else:
            idx, ref_i = stage2_indices(rng, n, c.n_frames, c.sample_rate)
            crop = random_resized_crop_params(rng, size[1], size[0], c.crop_scale, c.crop_ratio)
            ref = self._frame(record, ref_i)
            element = {
                "frames": np.stack([crop_resize(self._frame(record, i), crop, c.resolution) for i in idx]),
                "poses": np.stack([crop_resize(self._pose(record, i, size), crop, c.resolution) for i in idx]),
                "reference": crop_resize(ref, crop, c.resolution),
            }
        element["clip"] = clip_input(ref, c.clip_size)
        element["index"] = np.int64(index)
        return element if self.raw or c.uint8_output else normalize_batch(element)


# ----------------------------------------------------------------------------------------------
# Order, sharding, batching


class EpochOrder:
    """Position in the repeated stream -> ``(epoch, record index)``: a fresh global shuffle per epoch.

    An epoch is ``per_epoch`` positions (the dataset length rounded down to a multiple of the host
    count); its records are the first ``per_epoch`` of that epoch's permutation of all records.
    """

    def __init__(self, num_records: int, per_epoch: int, seed: int):
        self.num_records = num_records
        self.per_epoch = per_epoch
        self.permutation = grain.MapDataset.range(num_records).shuffle(seed=seed % 2**32)

    def __call__(self, position: int, _=None) -> tuple[int, int]:
        epoch, i = divmod(position, self.per_epoch)
        return epoch, int(self.permutation[epoch * self.num_records + i])


def _process_info(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
    return process_index, process_count


def make_map_dataset(
    config: DataConfig | Mapping | Any,
    source=None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    batch: bool = True,
) -> grain.MapDataset:
    """This host's random-access pipeline: (shuffle, repeat, shard, sample, batch) as a ``MapDataset``.

    ``source``: a random-access source of records (default: ``open_dataset(config.path)``).
    ``process_index``/``process_count`` default to jax's; pass them to simulate several hosts.
    With ``batch=False`` the elements are unbatched (for inspection and tests).
    """
    config = data_config(config)
    if source is None:
        # imported here: TFDS is needed only to open a dataset directory, not for an in-memory source
        from data_pipelines import dataset as dataset_lib

        source = dataset_lib.open_dataset(config.path)
    process_index, process_count = _process_info(process_index, process_count)
    n = len(source)
    per_epoch = n - n % process_count
    if per_epoch == 0:
        raise ValueError(f"{n} records cannot be split across {process_count} hosts")
    if config.batch_size <= 0 or config.batch_size % process_count:
        raise ValueError(f"batch_size {config.batch_size} is not a positive multiple of the {process_count} hosts")
    ds = grain.MapDataset.range(per_epoch).repeat(config.num_epochs)
    ds = ds.map_with_index(EpochOrder(n, per_epoch, config.seed))
    ds = ds[process_index::process_count]
    ds = ds.map(Sampler(config, source, raw=True))
    if batch:
        # float conversion fused into batching: the float32 batch is written once, from uint8
        batch_fn = _stack if config.uint8_output else _stack_normalized
        ds = ds.batch(config.batch_size // process_count, drop_remainder=True, batch_fn=batch_fn)
    elif not config.uint8_output:
        ds = ds.map(normalize_batch)
    return ds


def _stack(elements: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def _stack_normalized(elements: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return normalize_batch(_stack(elements))


def _absl_flags_parsed() -> None:
    """Grain's worker machinery reads absl flags (e.g. ``grain_enable_multiprocess_worker_profiling``);
    a library call has no ``absl.app.run`` to parse them, and reading an unparsed flag raises, so the
    defaults are taken as parsed (found on a GPU image: the demo's training stopped at its first batch)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iter_dataset(config: DataConfig | Mapping | Any, source=None, **kwargs) -> grain.IterDataset:
    """``make_map_dataset`` -> ``to_iter_dataset`` (+ ``mp_prefetch`` worker processes when
    ``num_workers > 0``). ``iter()`` of it is a checkpointable iterator (``get_state``/``set_state``;
    with Orbax: ``grain.checkpoint.CheckpointSave(it)``). Close it (``it.close()``) when done with workers.
    """
    config = data_config(config)
    ds = make_map_dataset(config, source, **kwargs)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, config.read_threads), prefetch_buffer_size=max(1, config.prefetch))
    )
    if config.num_workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.num_workers, per_worker_buffer_size=config.prefetch)
        )
    return it


def make_iterator(config: DataConfig | Mapping | Any, source=None, **kwargs):
    """``iter(make_iter_dataset(...))``: yields this host's batches (dicts of numpy arrays)."""
    return iter(make_iter_dataset(config, source, **kwargs))


# ----------------------------------------------------------------------------------------------
# Host-local batch -> globally sharded jax arrays


def to_global_batch(batch: Mapping[str, np.ndarray], mesh, batch_axes: Sequence[str] = ("data", "fsdp")) -> dict:
    """Host-local numpy batch -> ``jax.Array``s of the global batch, the leading axis sharded over
    ``batch_axes`` (those the mesh has), everything else replicated. Every host calls this with its own
    ``batch_size / process_count`` rows (``jax.make_array_from_process_local_data``)."""
    import jax

    from anim_jax.parallel import batch_sharding

    shards = math.prod(mesh.shape[a] for a in batch_axes if a in mesh.shape)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_rows = v.shape[0] * jax.process_count()
        if global_rows % shards:
            raise ValueError(f"global batch {global_rows} ({k}) is not divisible by the {shards} batch shards")
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, tuple(batch_axes)), v)
    return out
