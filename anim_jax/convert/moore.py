"""Converting Moore-AnimateAnyone, MusePose and AnimateDiff checkpoints into a converted-weights
directory, and exporting one back to Moore-AnimateAnyone's four files.

Inputs (any of them; each component is converted from the files that feed it):

* ``denoiser``: ``denoising_unet.pth`` (Moore's stage-1 2-D keys, 686 at SD1.5 size) or any diffusers
  2-D UNet weights (an SD1.5 ``unet`` folder), plus optionally ``motion_module``: Moore's
  ``motion_module.pth``, an AnimateDiff ``mm_sd_v15.ckpt`` (v1) / ``mm_sd_v15_v2.ckpt`` (v2) (possibly
  under a ``"state_dict"`` key), or a diffusers ``MotionAdapter`` (folder or safetensors). The two files
  are merged: together they must hold every key of the model exactly once. (Moore loads them with
  ``strict=False``, where a missing key silently keeps its SD1.5 or random value.) A key that is in
  both files is accepted only when both copies are identical, unless ``prefer_denoiser_file``, which
  takes the denoiser file's copy, as Moore's loading order does.
* ``reference_net``: ``reference_unet.pth`` (682 keys). A full 2-D UNet (e.g. SD1.5 weights, for
  stage-1 initialisation) is accepted too; its ``conv_norm_out``/``conv_out`` are dropped, as the
  original ReferenceNet has no output head.
* ``pose_guider``: ``pose_guider.pth``; the channels come from the shapes.
* ``vae`` / ``image_encoder``: diffusers ``AutoencoderKL`` and transformers
  ``CLIPVisionModelWithProjection`` folders (``config.json`` + weights).
* ``unet_config``: the SD1.5 ``unet/config.json`` (or its folder), needed for the two UNets. Head
  counts and other options cannot be read from shapes; everything that has a shape is then checked
  strictly against the files.

The motion layout (levels, mid block, transformer and attention blocks, position-encoding length) is
inferred from the motion checkpoint's key names and shapes; only the head count (default 8, or a
MotionAdapter's ``config.json``) and the GroupNorm group count (default 32) are not inferable. The
``pos_encoder.pe`` buffers are checked against the sinusoidal formula and not stored (the model
recomputes them).

Memory and time: everything is planned from the files' metadata first (names, shapes, dtypes; no
tensor data apart from the small ``pe`` buffers), so every mismatch is reported before anything is
written. Then each tensor is read, re-laid-out (cache-blocked transposes) and streamed to its
safetensors file by a reader thread one tensor ahead of the writer: peak memory is a few tensors,
whatever the checkpoint size.

The output directory is assembled under a hidden temporary name next to it (``anim_jax.json`` written
last) and renamed into place when complete; a failed conversion removes it, and a killed one leaves
only the hidden directory, which has no ``anim_jax.json`` until the very end. It is never mistaken for
a converted-weights directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from anim_jax import native
from anim_jax import storage
from anim_jax.atomic import atomic_dir
from anim_jax.convert import layout, model_configs, readers
from anim_jax.convert.loader import check_keys, expected_torch_shapes
from anim_jax.convert.mapping import CheckpointMismatchError
from anim_jax.convert.readers import CheckpointReader, open_checkpoint

__all__ = [
    "MOORE_FILES",
    "ConversionInputs",
    "ComponentReport",
    "ConversionReport",
    "ExportReport",
    "convert",
    "export_moore",
    "format_report",
    "moore_inputs",
]

# Moore-AnimateAnyone / MusePose file names, by component.
MOORE_FILES = {
    "denoiser": "denoising_unet.pth",
    "reference_net": "reference_unet.pth",
    "pose_guider": "pose_guider.pth",
    "motion_module": "motion_module.pth",
}
OUTPUT_HEAD_KEYS = ("conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight", "conv_out.bias")
DTYPES = ("float32", "float16", "bfloat16", "keep")

_PE_KEY = re.compile(r"\.pos_encoder\.pe$|\.pos_embed\.pe$")


# ------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class ConversionInputs:
    """Paths of everything ``convert`` reads; None means "not converted" (``unet_config``: see module doc)."""

    denoiser: pathlib.Path | None = None
    motion_module: pathlib.Path | None = None
    reference_net: pathlib.Path | None = None
    pose_guider: pathlib.Path | None = None
    vae: pathlib.Path | None = None
    image_encoder: pathlib.Path | None = None
    unet_config: pathlib.Path | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, storage.as_path(value))  # a gs:// URL stays one (see _local_inputs)


# The command-line flag of each input, for errors about a missing file.
INPUT_FLAGS = {"denoiser": "--denoiser", "motion_module": "--motion-module", "reference_net": "--reference-net",
               "pose_guider": "--pose-guider", "vae": "--vae", "image_encoder": "--image-encoder",
               "unet_config": "--sd-unet-config"}


def _check_remote_inputs(inputs: ConversionInputs) -> None:
    """Every URL input exists (and its bucket is reachable) before anything is downloaded; raises
    ``FileNotFoundError`` naming the flag."""
    for name, flag in INPUT_FLAGS.items():
        path = getattr(inputs, name)
        if path is not None and storage.is_url(path):
            storage.check_bucket(path, flag)
            if not path.exists():
                raise FileNotFoundError(f"{flag} {str(path)!r} does not exist")


@contextlib.contextmanager
def _local_inputs(inputs: ConversionInputs):
    """``(inputs, names)``: the inputs with each URL (file or folder) replaced by a temporary local
    download (the readers seek and mmap local files; removed on exit), and {local path: URL}, so
    reports and errors name what the user gave."""
    with contextlib.ExitStack() as stack:
        local, names, copies = {}, {}, {}
        for f in dataclasses.fields(inputs):
            path = getattr(inputs, f.name)
            if path is not None and storage.is_url(path):
                if str(path) not in copies:  # the same URL given twice is downloaded once
                    copies[str(path)] = copy = stack.enter_context(storage.local_copy(path))
                    names[str(copy)] = str(path)
                    config = path.parent / "config.json"
                    if copy.is_file() and f.name == "motion_module" and config.is_file():
                        storage.download(config, copy.parent / "config.json")  # a MotionAdapter file's settings
                path = copies[str(path)]
            local[f.name] = path
        yield ConversionInputs(**local), names


def _by_url(text: str, names: Mapping[str, str]) -> str:
    """``text`` with each temporary download's path replaced by its URL."""
    for local, url in names.items():
        text = text.replace(local, url)
    return text


def moore_inputs(moore_dir: str | os.PathLike | None = None, **paths) -> ConversionInputs:
    """``ConversionInputs`` from a Moore-AnimateAnyone / MusePose weights folder (``denoising_unet.pth``,
    ``reference_unet.pth``, ``pose_guider.pth``, ``motion_module.pth``); explicit ``paths`` (the
    ``ConversionInputs`` field names) override the folder's files. A file the folder lacks is left out."""
    found: dict[str, Any] = {}
    if moore_dir is not None:
        folder = storage.as_path(moore_dir)
        if storage.is_url(folder):
            storage.check_bucket(folder, "--moore")
        if not folder.is_dir():
            raise FileNotFoundError(f"--moore {str(folder)!r}: not a directory")
        found = {name: folder / file for name, file in MOORE_FILES.items() if (folder / file).is_file()}
        if not found:
            raise FileNotFoundError(
                f"{folder}: none of {', '.join(MOORE_FILES.values())} is there; "
                "not a Moore-AnimateAnyone / MusePose weights folder"
            )
    found.update({k: v for k, v in paths.items() if v is not None})
    return ConversionInputs(**found)


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


# ------------------------------------------------------------------------------------------------
# Sources: which file holds a PyTorch key


@dataclasses.dataclass(frozen=True)
class _Source:
    reader: CheckpointReader
    key: str  # the key in that file (may differ from the PyTorch key we need, e.g. diffusers names)

    @property
    def file(self) -> str:
        return str(self.reader.path)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.reader.shape(self.key))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.reader.dtype(self.key))

    def read(self) -> np.ndarray:
        return self.reader[self.key]


def _sources(reader: CheckpointReader, renames: Mapping[str, str] | None = None) -> dict[str, _Source]:
    """{PyTorch key: source}; ``renames`` maps our key -> the file's key (default: identity)."""
    if renames is None:
        return {k: _Source(reader, k) for k in reader}
    return {ours: _Source(reader, theirs) for ours, theirs in renames.items()}


# ------------------------------------------------------------------------------------------------
# Planning


@dataclasses.dataclass
class _Tensor:
    nnx_path: str
    nnx_shape: tuple[int, ...]
    source: _Source

    @property
    def size(self) -> int:
        return math.prod(self.nnx_shape)


@dataclasses.dataclass
class ComponentReport:
    """What one component was (or, in a dry run, would be) converted from."""

    name: str
    tensors: int  # stored
    parameters: int
    checkpoint_keys: int  # read from the checkpoints: the stored tensors plus checked buffers
    source_dtypes: tuple[str, ...]
    sources: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclasses.dataclass
class _Plan:
    name: str
    config: dict  # JSON, as models.factory.build reads it
    tensors: list[_Tensor]
    sources: list[str]
    notes: list[str]
    checkpoint_keys: int

    def report(self) -> ComponentReport:
        return ComponentReport(
            name=self.name,
            tensors=len(self.tensors),
            parameters=sum(t.size for t in self.tensors),
            checkpoint_keys=self.checkpoint_keys,
            source_dtypes=tuple(sorted({str(t.source.dtype) for t in self.tensors})),
            sources=tuple(self.sources),
            notes=tuple(self.notes),
        )


def _plan(name: str, config: dict, keymap, given: dict[str, _Source], files: Sequence[str],
          notes: list[str]) -> _Plan:
    from anim_jax.models import factory

    model = factory.build(name, config, abstract=True)
    expected = expected_torch_shapes(model, keymap)
    check_keys({k: shape for k, (_, shape) in expected.items()}, {k: s.shape for k, s in given.items()},
               source=f"{name} (read from {', '.join(files)})", ignored=keymap.ignored,
               files={k: s.file for k, s in given.items()})
    tensors = [_Tensor(path, layout.nnx_shape(path, shape), given[key]) for key, (path, shape) in expected.items()]
    return _Plan(name, config, tensors, list(files), notes, len(given))


def _read_json(path: pathlib.Path, what: str) -> dict:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} does not hold a JSON object")
    return data


def _folder_config(path: pathlib.Path | None) -> pathlib.Path | None:
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    return None


class _Readers:
    """Opened checkpoints, closed together."""

    def __init__(self):
        self._open: list[CheckpointReader] = []

    def open(self, path: pathlib.Path, what: str) -> CheckpointReader:
        if not path.exists():
            raise FileNotFoundError(f"{what}: {path} does not exist")
        reader = open_checkpoint(path)
        self._open.append(reader)
        return reader

    def close(self) -> None:
        for r in self._open:
            r.close()
        self._open.clear()


def _unet_config(inputs: ConversionInputs):
    path = inputs.unet_config or _folder_config(inputs.denoiser) or _folder_config(inputs.reference_net)
    if path is None:
        raise ValueError(
            "the UNet config is needed to convert the denoiser / reference net: pass --sd-unet-config "
            "(Stable Diffusion 1.5's unet/config.json or its folder); head counts and other options "
            "cannot be read from the weights"
        )
    data = _read_json(pathlib.Path(path), "UNet config")
    try:
        return model_configs.unet_config_from_diffusers(data), str(path)
    except (TypeError, ValueError) as e:
        raise ValueError(f"UNet config {path}: {e}") from None


def _motion_sources(reader: CheckpointReader) -> tuple[dict[str, _Source], str, dict]:
    """The motion checkpoint's keys in the original format; its format; its adapter config (if any).

    A prefix that every key carries (``module.`` from DataParallel, ``unet.`` from a training
    script's wrapper) is dropped."""
    from anim_jax.convert import motion_keys

    keys = list(reader)
    strip = next((p for p in ("module.", "unet.") if keys and all(k.startswith(p) for k in keys)), "")
    plain = {k[len(strip):]: k for k in keys}
    if any("temporal_transformer." in k for k in plain):
        return _sources(reader, plain), "original", {}
    if any(re.search(r"(^|\.)motion_modules\.\d+\.(norm|proj_in|proj_out|transformer_blocks)\.", k) for k in plain):
        try:
            renames = {ours: plain[theirs] for ours, theirs in
                       motion_keys.diffusers_to_original_keys({k: k for k in plain}).items()}
        except ValueError as e:
            raise ValueError(f"{reader.path}: {e}") from None
        config = {}
        cfg_path = reader.path.parent / "config.json"
        if cfg_path.is_file():
            config = _read_json(cfg_path, "MotionAdapter config")
        return _sources(reader, renames), "diffusers MotionAdapter", config
    raise ValueError(
        f"{reader.path}: no motion-module keys (neither AnimateDiff's '...motion_modules.<j>.temporal_transformer.*' "
        "nor diffusers MotionAdapter's '...motion_modules.<j>.transformer_blocks.*'); first keys: "
        f"{keys[:3]}"
    )


def _motion_config(sources: dict[str, _Source], fmt: str, adapter_config: dict, *, heads, max_len, norm_groups,
                   path: pathlib.Path):
    from anim_jax.models.motion import check_pe_buffers

    overrides: dict[str, Any] = {}
    if adapter_config:  # a diffusers MotionAdapter's config.json
        for ours, theirs in (("num_attention_heads", "motion_num_attention_heads"),
                             ("norm_num_groups", "motion_norm_num_groups"),
                             ("temporal_position_encoding_max_len", "motion_max_seq_length")):
            if adapter_config.get(theirs) is not None:
                overrides[ours] = int(adapter_config[theirs])
    for ours, value in (("num_attention_heads", heads), ("norm_num_groups", norm_groups)):
        if value is not None:
            overrides[ours] = int(value)
    shapes = {k: s.shape for k, s in sources.items()}
    pe_keys = [k for k in shapes if _PE_KEY.search(k)]
    if max_len is not None:
        if pe_keys and shapes[pe_keys[0]][1] != max_len:
            raise ValueError(
                f"{path}: --motion-max-len {max_len}, but the checkpoint's position encodings have length "
                f"{shapes[pe_keys[0]][1]} ({pe_keys[0]})"
            )
        overrides["temporal_position_encoding_max_len"] = int(max_len)
    elif pe_keys:  # the file's buffers decide, not an adapter config that may disagree
        overrides.pop("temporal_position_encoding_max_len", None)
    try:
        config = model_configs.motion_config_from_state_dict_shapes(shapes, **overrides)
        checked = 0
        for key in pe_keys:  # a half-precision checkpoint holds the table rounded: allow that rounding
            try:
                atol = max(1e-5, float(ml_dtypes.finfo(sources[key].dtype).eps))
            except ValueError:  # not a floating dtype: the formula check fails on its own
                atol = 1e-5
            checked += check_pe_buffers({key: sources[key].read()}, config, atol=atol)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config, len(pe_keys), checked


def _merge_denoiser_sources(base: dict[str, _Source], motion: dict[str, _Source], prefer_base: bool,
                            notes: list[str]) -> dict[str, _Source]:
    merged = dict(motion)
    dup_same, overridden = 0, []
    for key, src in base.items():
        if key in merged:
            other = merged[key]
            if src.shape == other.shape and src.dtype == other.dtype and np.array_equal(src.read(), other.read()):
                dup_same += 1
            elif prefer_base:
                overridden.append(key)
            else:
                raise CheckpointMismatchError(
                    f"denoiser: {key} is in both {src.file} and {other.file} with different values. Moore's "
                    "loading takes the denoiser file's copy (it is loaded last, with strict=False); pass "
                    "--prefer-denoiser-file to do the same"
                )
        merged[key] = src
    if dup_same:
        notes.append(f"{dup_same} keys are in both files with identical values (used once)")
    if overridden:
        notes.append(f"{len(overridden)} motion-module keys taken from the denoiser file, which overrides the "
                     f"motion-module file (--prefer-denoiser-file), e.g. {overridden[0]}")
    return merged


def _plan_all(inputs: ConversionInputs, rd: _Readers, *, motion_heads, motion_max_len, motion_norm_groups,
              prefer_denoiser_file) -> list[_Plan]:
    from anim_jax.convert.clip_keys import CLIP_KEYMAP
    from anim_jax.convert.pose_guider_keys import POSE_GUIDER_KEYMAP, pose_guider_config_from_state_dict
    from anim_jax.convert.unet_keys import DENOISER_KEYMAP, UNET_KEYMAP
    from anim_jax.convert.vae_keys import VAE_KEYMAP, rename_legacy_vae_keys
    from anim_jax.models.factory import PoseGuiderConfig, to_json

    plans: list[_Plan] = []
    if inputs.motion_module is not None and inputs.denoiser is None:
        raise ValueError(
            "a motion module alone is not a denoiser: also pass the 2-D weights with --denoiser "
            "(Moore's denoising_unet.pth, or a Stable Diffusion 1.5 unet folder for AnimateDiff)"
        )
    unet_config = unet_config_path = None
    if inputs.denoiser is not None or inputs.reference_net is not None:
        unet_config, unet_config_path = _unet_config(inputs)

    if inputs.denoiser is not None:
        notes = [f"UNet config from {unet_config_path}"]
        base = rd.open(inputs.denoiser, "denoiser")
        files = [str(base.path)]
        given = _sources(base)
        config = unet_config
        if inputs.motion_module is not None:
            motion_reader = rd.open(inputs.motion_module, "motion module")
            files.append(str(motion_reader.path))
            msrc, fmt, adapter_cfg = _motion_sources(motion_reader)
            mcfg, n_pe, _ = _motion_config(msrc, fmt, adapter_cfg, heads=motion_heads, max_len=motion_max_len,
                                           norm_groups=motion_norm_groups, path=motion_reader.path)
            given = _merge_denoiser_sources(given, msrc, prefer_denoiser_file, notes)
            config = dataclasses.replace(unet_config, motion=mcfg)
            n_modules = len({m[1] for k in msrc if (m := re.match(r"^(.*?motion_modules\.\d+)\.", k))})
            notes.append(
                f"motion ({fmt} format): {n_modules} modules at levels {list(mcfg.levels)}, "
                f"mid block {'yes' if mcfg.use_mid_block else 'no'}, {mcfg.num_transformer_block} transformer "
                f"block(s) x {mcfg.num_attention_blocks} attention blocks, position encoding max_len "
                f"{mcfg.temporal_position_encoding_max_len}, {mcfg.num_attention_heads} heads, "
                f"{mcfg.norm_num_groups} norm groups"
            )
            if n_pe:
                notes.append(f"{n_pe} pos_encoder.pe buffers checked against the formula, not stored")
        else:
            motion_keys_in_base = [k for k in given if ".motion_modules." in k]
            if motion_keys_in_base:  # a full stage-2 denoiser in one file
                mcfg, n_pe, _ = _motion_config(given, "original", {}, heads=motion_heads, max_len=motion_max_len,
                                               norm_groups=motion_norm_groups, path=base.path)
                config = dataclasses.replace(unet_config, motion=mcfg)
                notes.append(f"motion modules found in the denoiser file ({len(motion_keys_in_base)} keys)")
            else:
                notes.append("no motion modules (a stage-1 / 2-D denoiser)")
        plans.append(_plan("denoiser", to_json(config), DENOISER_KEYMAP, given, files, notes))

    if inputs.reference_net is not None:
        reader = rd.open(inputs.reference_net, "reference net")
        given = _sources(reader)
        notes = [f"UNet config from {unet_config_path}"]
        if all(k in given for k in OUTPUT_HEAD_KEYS):
            for k in OUTPUT_HEAD_KEYS:
                del given[k]
            notes.append("conv_norm_out/conv_out of the full UNet dropped: the ReferenceNet has no output head")
        plans.append(_plan("reference_net", to_json(unet_config), UNET_KEYMAP, given, [str(reader.path)], notes))

    if inputs.pose_guider is not None:
        reader = rd.open(inputs.pose_guider, "pose guider")
        try:
            emb, channels = pose_guider_config_from_state_dict({k: reader.shape(k) for k in reader})
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{reader.path}: {e}") from None
        config = to_json(PoseGuiderConfig(emb, channels))
        plans.append(_plan("pose_guider", config, POSE_GUIDER_KEYMAP, _sources(reader), [str(reader.path)],
                           [f"channels {list(channels)} -> {emb}"]))

    if inputs.vae is not None:
        cfg_path = inputs.vae / "config.json" if inputs.vae.is_dir() else None
        if cfg_path is None or not cfg_path.is_file():
            raise FileNotFoundError(f"--vae {inputs.vae}: expected a diffusers AutoencoderKL folder with config.json")
        try:
            vae_config = model_configs.vae_config_from_diffusers(_read_json(cfg_path, "VAE config"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        reader = rd.open(inputs.vae, "VAE")
        try:
            renames = rename_legacy_vae_keys({k: k for k in reader})  # current name -> the file's
        except ValueError as e:
            raise ValueError(f"{reader.path}: {e}") from None
        notes = [f"config from {cfg_path}"]
        if any(new != old for new, old in renames.items()):
            notes.append("legacy attention names (query/key/value/proj_attn) renamed")
        plans.append(_plan("vae", to_json(vae_config), VAE_KEYMAP, _sources(reader, renames), [str(reader.path)],
                           notes))

    if inputs.image_encoder is not None:
        cfg_path = inputs.image_encoder / "config.json" if inputs.image_encoder.is_dir() else None
        if cfg_path is None or not cfg_path.is_file():
            raise FileNotFoundError(
                f"--image-encoder {inputs.image_encoder}: expected a transformers CLIPVisionModelWithProjection "
                "folder with config.json"
            )
        try:
            clip_config = model_configs.clip_config_from_transformers(_read_json(cfg_path, "image encoder config"))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        reader = rd.open(inputs.image_encoder, "image encoder")
        plans.append(_plan("image_encoder", to_json(clip_config), CLIP_KEYMAP, _sources(reader), [str(reader.path)],
                           [f"config from {cfg_path}"]))
    if not plans:
        raise ValueError("nothing to convert: give --moore and/or component paths")
    return plans


# ------------------------------------------------------------------------------------------------
# Streaming writes


class _Prefetch:
    """Produces values on one worker thread, a few ahead of the consumer.

    The consumer (a file writer) asks for keys in ``order``; asking out of order still works, it just
    waits. At most ``depth + 1`` results are pending or held, so memory stays a few tensors.
    """

    def __init__(self, order: Sequence[str], produce: Callable[[str], np.ndarray], depth: int = 2):
        self._order = list(order)
        self._pos = {k: i for i, k in enumerate(self._order)}
        self._produce = produce
        self._depth = depth
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._done: set[str] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="anim-jax-convert")

    def get(self, key: str) -> np.ndarray:
        if key in self._done:
            raise RuntimeError(f"{key} was already produced")
        fut = self._pending.pop(key, None) or self._pool.submit(self._produce, key)
        i = self._pos[key]
        for nxt in self._order[i + 1 : i + 1 + self._depth]:
            if len(self._pending) >= self._depth:
                break
            if nxt not in self._pending and nxt not in self._done:
                self._pending[nxt] = self._pool.submit(self._produce, nxt)
        value = fut.result()
        self._done.add(key)
        return value

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _LazyArray:
    """Shape and dtype now, data (from the prefetcher) when the writer asks for it."""

    __slots__ = ("shape", "dtype", "_key", "_prefetch")

    def __init__(self, shape, dtype, key, prefetch: _Prefetch):
        self.shape, self.dtype, self._key, self._prefetch = tuple(shape), np.dtype(dtype), key, prefetch

    def __array__(self, dtype=None, copy=None):
        value = self._prefetch.get(self._key)
        return value if dtype is None else value.astype(dtype, copy=False)


def _safetensors_order(items: Iterable[tuple[str, np.dtype]]) -> list[str]:
    # The order readers.write_safetensors writes in (largest itemsize first, then by name), so the
    # prefetcher works ahead of the writer; a different order would be correct, only slower.
    return [k for k, _ in sorted(items, key=lambda kv: (-np.dtype(kv[1]).itemsize, kv[0]))]


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                             dynamic_ncols=True, leave=True)

    def component(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_description(name)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _target_dtype(dtype: str, source: np.dtype) -> np.dtype:
    if dtype == "keep":
        return np.dtype(source)
    if dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _write_component(plan: _Plan, path: pathlib.Path, dtype: str, progress: _Progress) -> None:
    by_path = {t.nnx_path: t for t in plan.tensors}
    targets = {t.nnx_path: _target_dtype(dtype, t.source.dtype) for t in plan.tensors}

    def produce(nnx_path: str) -> np.ndarray:
        t = by_path[nnx_path]
        raw = t.source.read()
        if tuple(raw.shape) != t.source.shape:
            raise readers.CheckpointReadError(f"{t.source.file}: {t.source.key} changed shape while reading")
        out = layout.from_torch(nnx_path, raw, dtype=targets[nnx_path])
        progress.update(raw.nbytes)
        return out

    order = _safetensors_order(targets.items())
    with _Prefetch(order, produce) as prefetch:
        lazy = {p: _LazyArray(by_path[p].nnx_shape, targets[p], p, prefetch) for p in by_path}
        readers.write_safetensors(path, lazy)


# ------------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass
class ConversionReport:
    out: str
    components: list[ComponentReport]
    seconds: float
    bytes_written: int
    dry_run: bool = False


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
    if storage.is_url(out):  # a missing bucket: one line now, not an upload error after the work
        storage.check_bucket(out, "--out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")


def convert(
    inputs: ConversionInputs,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    motion_heads: int | None = None,
    motion_max_len: int | None = None,
    motion_norm_groups: int | None = None,
    prefer_denoiser_file: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Converts ``inputs`` into the converted-weights directory ``out`` (see the module docstring).

    ``dtype``: the stored parameter dtype (``"keep"``: each tensor's source dtype); loading casts to
    the model's parameter dtype either way. ``dry_run`` checks and plans everything (the key/shape
    checks, config inference, ``pe`` validation) without writing. Inputs may be URLs (``gs://``):
    each is downloaded to a temporary local copy first.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    out = storage.as_path(out)  # a gs:// URL: staged locally, uploaded with anim_jax.json last
    if not dry_run:
        _check_out(out, overwrite)
    _check_remote_inputs(inputs)
    start = time.perf_counter()
    with _local_inputs(inputs) as (local, names):
        try:
            return _convert(local, out, names, start, dtype=dtype, motion_heads=motion_heads,
                            motion_max_len=motion_max_len, motion_norm_groups=motion_norm_groups,
                            prefer_denoiser_file=prefer_denoiser_file, dry_run=dry_run, progress=progress)
        except (readers.CheckpointError, CheckpointMismatchError, FileNotFoundError, ValueError) as e:
            if names and len(e.args) == 1 and isinstance(e.args[0], str):
                e.args = (_by_url(e.args[0], names),)  # name the URL, not the temporary download
            raise


def _convert(inputs: ConversionInputs, out, names: Mapping[str, str], start: float, *, dtype: str, motion_heads,
             motion_max_len, motion_norm_groups, prefer_denoiser_file: bool, dry_run: bool,
             progress: bool) -> ConversionReport:
    from anim_jax import __version__
    from anim_jax.convert import store
    from anim_jax.diffusion import moore_inference_schedule
    from anim_jax.models.factory import to_json

    rd = _Readers()
    try:
        plans = _plan_all(inputs, rd, motion_heads=motion_heads, motion_max_len=motion_max_len,
                          motion_norm_groups=motion_norm_groups, prefer_denoiser_file=prefer_denoiser_file)
        for p in plans:
            p.sources = [_by_url(x, names) for x in p.sources]
            p.notes = [_by_url(x, names) for x in p.notes]
        reports = [p.report() for p in plans]
        if dry_run:
            return ConversionReport(str(out), reports, time.perf_counter() - start, 0, dry_run=True)
        written = 0
        bar = _Progress(sum(t.source.reader.nbytes(t.source.key) for p in plans for t in p.tensors), progress)
        try:
            with atomic_dir(out) as tmp:
                for plan in plans:
                    bar.component(plan.name)
                    _write_component(plan, tmp / f"{plan.name}.safetensors", dtype, bar)
                    written += (tmp / f"{plan.name}.safetensors").stat().st_size
                config: dict[str, Any] = {p.name: p.config for p in plans}
                config["schedule"] = to_json(moore_inference_schedule())
                config[native.KEY] = native.MOORE.to_json()  # what animate uses when given no size/steps/guidance
                config["conversion"] = {
                    "tool": f"anim-jax {__version__} convert",
                    "dtype": dtype,
                    "sources": {p.name: p.sources for p in plans},
                    "notes": {p.name: p.notes for p in plans},
                }
                store.write_config(tmp, config)  # last: only a complete directory has anim_jax.json
        finally:
            bar.close()
        return ConversionReport(str(out), reports, time.perf_counter() - start, written)
    finally:
        rd.close()


# ------------------------------------------------------------------------------------------------
# Export to Moore-AnimateAnyone's files


@dataclasses.dataclass
class ExportReport:
    out: str
    files: dict[str, int]  # file name -> tensors
    seconds: float
    notes: list[str]


def _motion_pe_buffers(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]], max_len: int) -> dict[str, np.ndarray]:
    from anim_jax.models.motion import sinusoidal_position_table

    out = {}
    pattern = re.compile(r"^(.*\.temporal_transformer\.transformer_blocks\.\d+\.attention_blocks\.\d+)\.to_q\.weight$")
    for key in keys:
        if m := pattern.match(key):
            channels = shapes[key][0]
            out[f"{m[1]}.pos_encoder.pe"] = sinusoidal_position_table(max_len, channels)[None]
    return out


def export_moore(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "keep",
    overwrite: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Writes Moore-AnimateAnyone's ``denoising_unet.pth`` (the denoiser's 2-D keys),
    ``motion_module.pth`` (its motion-module keys plus the ``pos_encoder.pe`` buffers, recomputed),
    ``reference_unet.pth`` and ``pose_guider.pth`` from a converted-weights directory, as torch
    zip pickles (no torch needed). Components the directory lacks are skipped (noted); each file is
    written atomically. ``dtype="keep"`` keeps the stored dtype."""
    from anim_jax.convert import store, torch_writer
    from anim_jax.convert.pose_guider_keys import POSE_GUIDER_KEYMAP
    from anim_jax.convert.unet_keys import DENOISER_KEYMAP, UNET_KEYMAP
    from anim_jax.models import factory

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    if storage.is_url(out):  # a missing bucket: one line now, not an upload error after the work
        storage.check_bucket(out, "--out")
    if storage.is_url(weights):  # the readers seek in local files
        storage.check_bucket(weights, "--weights")
        if not storage.as_path(weights).is_dir():
            raise FileNotFoundError(f"--weights {str(weights)!r} is not a directory (expected `anim-jax convert` output)")
        with storage.local_copy(weights) as local:
            return export_moore(local, out, dtype=dtype, overwrite=overwrite, progress=progress)
    start = time.perf_counter()
    weights, out = pathlib.Path(weights), storage.as_path(out)
    config = store.read_config(weights)
    keymaps = {"denoiser": DENOISER_KEYMAP, "reference_net": UNET_KEYMAP, "pose_guider": POSE_GUIDER_KEYMAP}
    notes: list[str] = []
    jobs: list[tuple[str, dict[str, tuple[str, tuple[int, ...]]], CheckpointReader]] = []
    opened: list[CheckpointReader] = []
    files: dict[str, int] = {}
    try:
        for name, keymap in keymaps.items():
            if name not in config:
                notes.append(f"{weights / store.CONFIG_NAME} has no {name}: skipped")
                continue
            model = factory.build(name, config[name], abstract=True)
            expected = expected_torch_shapes(model, keymap)  # torch key -> (nnx path, torch shape)
            path = weights / f"{name}.safetensors"
            reader = readers.SafetensorsReader(path)
            opened.append(reader)
            check_keys({p: layout.nnx_shape(p, s) for p, s in expected.values()},
                       {k: tuple(reader.shape(k)) for k in reader},
                       source=f"{path} ({name} in {weights / store.CONFIG_NAME})")
            jobs.append((name, expected, reader))

        outputs: list[tuple[str, dict[str, Any]]] = []
        for name, expected, reader in jobs:
            entries = {k: expected[k] for k in sorted(expected, key=_natural_key)}
            if name != "denoiser":
                outputs.append((MOORE_FILES[name], _export_tensors(entries, reader, dtype)))
                continue
            motion = {k: v for k, v in entries.items() if ".motion_modules." in k}
            spatial = {k: v for k, v in entries.items() if k not in motion}
            outputs.append((MOORE_FILES["denoiser"], _export_tensors(spatial, reader, dtype)))
            if not motion:
                notes.append("the denoiser has no motion modules: no motion_module.pth")
                continue
            tensors: dict[str, Any] = _export_tensors(motion, reader, dtype)
            mcfg = config["denoiser"]["motion"]
            if mcfg.get("temporal_position_encoding", True):
                pe = _motion_pe_buffers(motion, {k: v[1] for k, v in motion.items()},
                                        int(mcfg["temporal_position_encoding_max_len"]))
                pe_dtype = next(iter(tensors.values())).dtype  # that of the module parameters
                for k, v in pe.items():
                    tensors[k] = v.astype(pe_dtype)
                tensors = {k: tensors[k] for k in sorted(tensors, key=_natural_key)}
                notes.append(f"{len(pe)} pos_encoder.pe buffers recomputed for motion_module.pth")
            outputs.append((MOORE_FILES["motion_module"], tensors))

        if not outputs:
            raise ValueError(f"{weights}: no denoiser, reference_net or pose_guider to export")
        out.mkdir(parents=True, exist_ok=True)
        existing = [f for f, _ in outputs if (out / f).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{out}: {', '.join(existing)} already exist (pass --overwrite to replace them)")
        bar = _Progress(sum(_nbytes(t) for _, tensors in outputs for t in tensors.values()), progress)
        try:
            for file, tensors in outputs:
                bar.component(file)
                lazy_keys = [k for k, t in tensors.items() if isinstance(t, _ExportTensor)]
                with _Prefetch(lazy_keys, lambda k, tensors=tensors: tensors[k].produce()) as prefetch:
                    streamed = {
                        k: _LazyArray(t.shape, t.dtype, k, prefetch) if isinstance(t, _ExportTensor) else t
                        for k, t in tensors.items()
                    }
                    torch_writer.save_torch_state_dict(out / file, streamed, on_tensor=lambda key, n: bar.update(n))
                files[file] = len(tensors)
        finally:
            bar.close()
    finally:
        for r in opened:
            r.close()
    return ExportReport(str(out), files, time.perf_counter() - start, notes)


class _ExportTensor:
    """One exported tensor: an NNX-layout safetensors entry, re-laid-out to PyTorch's on demand."""

    def __init__(self, reader: CheckpointReader, nnx_path: str, torch_shape: tuple[int, ...], dtype: np.dtype):
        self.reader, self.nnx_path, self.shape, self.dtype = reader, nnx_path, torch_shape, dtype

    def produce(self) -> np.ndarray:
        return layout.to_torch(self.nnx_path, self.reader[self.nnx_path], dtype=self.dtype)


def _nbytes(t) -> int:
    return math.prod(t.shape) * np.dtype(t.dtype).itemsize


def _export_tensors(entries: Mapping[str, tuple[str, tuple[int, ...]]], reader: CheckpointReader, dtype: str):
    return {
        key: _ExportTensor(reader, nnx_path, shape, _target_dtype(dtype, reader.dtype(nnx_path)))
        for key, (nnx_path, shape) in entries.items()
    }


# ------------------------------------------------------------------------------------------------
# Reporting


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.4g}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return str(n)


def format_report(report: ConversionReport) -> str:
    """A printable summary: one row per component, then its sources and notes."""
    rows = [("component", "tensors", "parameters", "keys read", "dtypes in", "source")]
    for c in report.components:
        rows.append((c.name, str(c.tensors), _human(c.parameters), str(c.checkpoint_keys), ",".join(c.source_dtypes),
                     " + ".join(pathlib.Path(s).name for s in c.sources)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for c in report.components:
        lines.append(f"{c.name}:")
        lines.extend(f"  from {s}" for s in c.sources)
        lines.extend(f"  {n}" for n in c.notes)
    total = sum(c.parameters for c in report.components)
    if report.dry_run:
        lines.append(f"dry run: everything checked, nothing written ({_human(total)} parameters, "
                     f"{report.seconds:.1f} s)")
    else:
        lines.append(f"wrote {report.out} ({_human(total)} parameters, {report.bytes_written / 2**30:.2f} GiB) "
                     f"in {report.seconds:.1f} s")
    return "\n".join(lines)
