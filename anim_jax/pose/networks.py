"""The converted DWPose directory: both networks' configurations and parameters.

Layout (the project's converted-weights convention, ``anim_jax.convert.store``)::

    DIR/anim_jax.json            {"dwpose": {"version", "detector": YOLOXConfig, "pose": RTMPoseConfig},
                                  "conversion": {...provenance...}}
    DIR/detector.safetensors     YOLOX parameters keyed by NNX path (BatchNorm folded)
    DIR/pose.safetensors         RTMPose parameters keyed by NNX path

``anim-jax convert-pose`` (``anim_jax.convert.dwpose``) writes it from DWPose's two ONNX files.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from anim_jax import atomic, storage, weights_dir
from anim_jax.convert import store
from anim_jax.pose.rtmpose import RTMPose, RTMPoseConfig
from anim_jax.pose.yolox import YOLOX, YOLOXConfig

CONFIG_KEY = "dwpose"
VERSION = 1
DETECTOR_FILE = "detector.safetensors"
POSE_FILE = "pose.safetensors"


def save_dwpose(
    directory: str | os.PathLike,
    detector: YOLOX,
    pose_net: RTMPose,
    *,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes both networks to ``directory``, which appears complete or not at all.

    An existing non-empty ``directory`` is replaced only with ``overwrite``. ``provenance`` is
    stored as the config's ``conversion`` entry (tool, source files).
    """
    out = storage.as_path(directory)  # a URL: staged locally, uploaded with anim_jax.json last
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"DWPose output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"DWPose output {str(out)!r} exists and is not empty (pass overwrite to replace it)")
    with atomic.atomic_dir(out) as tmp:
        store.save_params(detector, tmp / DETECTOR_FILE)
        store.save_params(pose_net, tmp / POSE_FILE)
        entry = {"version": VERSION, "detector": detector.config.to_dict(), "pose": pose_net.config.to_dict()}
        config: dict[str, Any] = {CONFIG_KEY: entry}
        if provenance is not None:
            config["conversion"] = dict(provenance)
        weights_dir.write_config(tmp, config)  # last: only a complete directory has anim_jax.json
    return out


def read_dwpose_config(directory: str | os.PathLike) -> tuple[YOLOXConfig, RTMPoseConfig]:
    directory = storage.as_path(directory)
    config = weights_dir.read_config(directory)
    entry = config.get(CONFIG_KEY)
    where = directory / weights_dir.CONFIG_NAME
    if not isinstance(entry, Mapping) or not isinstance(entry.get("detector"), Mapping) \
            or not isinstance(entry.get("pose"), Mapping):
        raise ValueError(
            f"{where} has no '{CONFIG_KEY}' entry with 'detector' and 'pose' configurations: not a DWPose "
            "conversion (create one with `anim-jax convert-pose`)"
        )
    if entry.get("version") != VERSION:
        raise ValueError(f"{where}: DWPose version {entry.get('version')!r}, this anim_jax reads {VERSION}")
    try:
        return YOLOXConfig.from_dict(entry["detector"]), RTMPoseConfig.from_dict(entry["pose"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad '{CONFIG_KEY}' configuration: {e}") from None


def load_dwpose(directory: str | os.PathLike, *, dtype=None, param_dtype=jnp.float32) -> tuple[YOLOX, RTMPose]:
    """The (detector, pose network) of a directory written by :func:`save_dwpose`; every
    parameter is checked strictly (missing, unexpected and misshaped reported together)."""
    directory = storage.as_path(directory)
    det_cfg, pose_cfg = read_dwpose_config(directory)
    detector = nnx.eval_shape(lambda: YOLOX(det_cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    pose_net = nnx.eval_shape(lambda: RTMPose(pose_cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    store.load_params(detector, directory / DETECTOR_FILE, dtype=param_dtype)
    store.load_params(pose_net, directory / POSE_FILE, dtype=param_dtype)
    return detector, pose_net
