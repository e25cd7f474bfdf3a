"""Initialising the model for training from its sources (``config.init``): a converted-weights
directory, a ControlNet (the PoseGuider), a stage-1 run's checkpoint, AnimateDiff motion modules.

``assign``/``read_weights_file`` are the strict copy of arrays into parameters that a shared
loader may replace; ``init_model`` decides what comes from where.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from anim_jax import storage
from anim_jax.models.animate_anyone import COMPONENTS, AnimateAnyone
from anim_jax.train import optim
from anim_jax.train.architecture import build_model

log = logging.getLogger(__name__)

def flat_arrays(module) -> dict[str, Any]:
    """``{dotted path: array}`` of every parameter."""
    return {optim.path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def assign(module: nnx.Module, arrays: Mapping[str, Any], *, source: str, select: Callable[[str], bool] = lambda p: True,
           require_all: bool = False) -> set[str]:
    """Copies ``arrays[path]`` into each selected parameter of ``module`` that ``arrays`` holds
    (shapes must match; values take the parameter's dtype and sharding; other arrays are ignored).
    ``require_all``: every selected parameter must be present. Returns the assigned paths."""
    from anim_jax.convert.loader import load

    report = load(module, arrays, select=select, ignore=lambda key: True, name=source,
                  allow_missing=None if require_all else (lambda path: True))
    return set(report.loaded)


def _is_motion(path: str) -> bool:
    return "motion_modules." in path


def read_weights_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from anim_jax.convert.readers import read_safetensors

    return read_safetensors(path)


def read_train_checkpoint(directory: str | os.PathLike, step: int | None = None,
                          items: Sequence[str] = ("params", "frozen")) -> dict[str, np.ndarray]:
    """Parameters of a training run's Orbax checkpoint (``<workdir>/checkpoints``) as host arrays
    keyed by their bundle path (``denoiser.conv_in.kernel`` ...), whatever mesh wrote them. Only
    ``items`` are read (not the optimizer state); ``step`` None: the latest."""
    import orbax.checkpoint as ocp
    from etils import epath

    from anim_jax.checkpoint import CheckpointManager

    directory = str(storage.absolute(directory))  # local, or a URL Orbax reads itself
    if not storage.as_path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    if step is None or step < 0:
        with CheckpointManager(directory, async_save=False) as mngr:
            step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory!r}")
    path = epath.Path(directory) / str(int(step)) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = dict(ckptr.metadata(path).item_metadata)
    item = {k: tree[k] for k in items if k in tree}
    if not item:
        raise ValueError(f"{path} holds none of {list(items)} (it has {sorted(tree)})")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
    out = {}
    for name, sub in restored.items():
        # Parameters keep their bundle paths; other items (opt_state, rng, step) are prefixed by name.
        prefix = () if name in ("params", "frozen") else (name,)
        for p, v in jax.tree_util.tree_flatten_with_path(sub)[0]:
            keys = prefix + tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p)
            out[".".join(keys)] = np.asarray(v)
    log.info("read %d arrays from %s (step %d)", len(out), path, step)
    return out


def load_motion_modules(denoiser: nnx.Module, path: str | os.PathLike) -> int:
    """Motion modules into every motion module of ``denoiser``, each strictly, from an AnimateDiff
    checkpoint (``mm_sd_v15_v2.ckpt`` original format, or a diffusers ``MotionAdapter`` state dict;
    positional-encoding buffers are ignored, the model recomputes them) or from a converted-weights
    directory whose denoiser has motion modules. Returns the number of modules."""
    from anim_jax.convert import readers, store
    from anim_jax.convert.loader import load_torch_state_dict
    from anim_jax.convert.mapping import prefixed
    from anim_jax.convert.motion_keys import MOTION_KEYMAP_DIFFUSERS, MOTION_KEYMAP_ORIGINAL
    from anim_jax.models.motion import MotionModule

    modules = [optim.path_str(p) for p, node in nnx.iter_graph(denoiser) if isinstance(node, MotionModule)]
    if not modules:
        raise ValueError("the denoiser has no motion modules to load (stage 2 needs config.model.motion)")
    if (storage.as_path(path) / store.CONFIG_NAME).is_file():
        file = storage.as_path(path) / "denoiser.safetensors"
        assign(denoiser, read_weights_file(file), source=str(file), select=_is_motion, require_all=True)
        return len(modules)
    sd = readers.read_checkpoint(path)
    sd = {re.sub(r"^(module\.|unet\.)", "", k): v for k, v in sd.items()}
    original = any("temporal_transformer." in k for k in sd)
    keymap = MOTION_KEYMAP_ORIGINAL if original else MOTION_KEYMAP_DIFFUSERS
    for p, node in nnx.iter_graph(denoiser):
        if isinstance(node, MotionModule):
            prefix = optim.path_str(p)
            load_torch_state_dict(node, prefixed(sd, prefix), keymap, source=f"{path} ({prefix}.*)")
    return len(modules)


def init_model(cfg) -> AnimateAnyone:
    """The model initialised for training from the sources ``config.init`` names (configs/stage1.py);
    an empty field is a source not used:

    * ``init.weights_dir``: a converted-weights directory (``anim-jax convert`` or a previous
      stage's export): every component it has. A missing ``reference_net`` is copied from its
      ``denoiser`` (Moore initialises both from the same SD UNet); motion modules in the file load
      only into a denoiser that has them (``config.model.motion``). Components without a source keep their random initialisation (a warning
      says so); with no ``weights_dir`` at all everything is random (tiny runs, benchmarks).
    * ``init.reference_net_from_denoiser``: a ReferenceNet with no source starts as a copy of the
      denoiser (random or loaded), as in Moore where both come from one SD UNet.
    * ``init.controlnet`` (stage 1's config): a ControlNet-openpose checkpoint for the PoseGuider.
    * ``init.stage1_checkpoint`` / ``init.stage1_step`` (stage 2's): a stage-1 run's Orbax
      checkpoint directory; its parameters (motion modules excepted) replace those of the same path.
    * ``init.motion_modules`` (stage 2's): AnimateDiff motion modules (``mm_sd_v15_v2.ckpt``).
    """
    init = cfg.init
    model = build_model(cfg)
    weights_dir = init.get("weights_dir", "")
    sources = {name: "random" for name in COMPONENTS}
    if weights_dir:
        d = storage.as_path(weights_dir)
        files = {name: d / f"{name}.safetensors" for name in COMPONENTS}
        for name in COMPONENTS:
            file = files[name]
            src_name = name
            if name == "reference_net" and not file.is_file() and files["denoiser"].is_file():
                file, src_name = files["denoiser"], "denoiser"
            if not file.is_file():
                continue
            module = getattr(model, name)
            arrays = read_weights_file(file)
            # Only the model's parameters are read: a 2-D denoiser ignores motion modules in the file.
            select = (lambda p: not _is_motion(p)) if src_name != name else (lambda p: True)
            done = assign(module, arrays, source=str(file), select=select)
            expected = {p for p in flat_arrays(module) if select(p)}
            missing = sorted(expected - done)
            if missing and not (name == "denoiser" and all(_is_motion(p) for p in missing)):
                from anim_jax.convert.mapping import CheckpointMismatchError

                raise CheckpointMismatchError(
                    f"{file} lacks {len(missing)} parameters of {name}: {', '.join(missing[:8])}"
                    + (" ..." if len(missing) > 8 else "")
                )
            sources[name] = str(file)
    if init.get("controlnet", ""):
        from anim_jax.convert import readers
        from anim_jax.convert.pose_guider_keys import load_controlnet_cond_embedding

        sd = readers.read_checkpoint(init.controlnet)
        load_controlnet_cond_embedding(model.pose_guider, sd, source=str(init.controlnet))
        sources["pose_guider"] = f"{init.controlnet} (ControlNet cond embedding)"
    if init.get("stage1_checkpoint", ""):
        arrays = read_train_checkpoint(init.stage1_checkpoint, int(init.get("stage1_step", -1)))
        done = assign(model, arrays, source=str(init.stage1_checkpoint), select=lambda p: not _is_motion(p))
        for name in COMPONENTS:
            if any(p.startswith(name + ".") for p in done):
                sources[name] = f"{init.stage1_checkpoint} (stage 1)"
    if sources["reference_net"] == "random" and init.get("reference_net_from_denoiser", False):
        # Moore starts both UNets from the same SD weights, so at step 0 the ReferenceNet's keys live
        # in the denoiser's feature space and reference attention can match like with like. Two
        # independent random inits lack that, and a from-scratch run learns to copy far more slowly.
        done = assign(model.reference_net, flat_arrays(model.denoiser), source="denoiser",
                      select=lambda p: not _is_motion(p), require_all=True)
        sources["reference_net"] = f"copy of the denoiser's {sources['denoiser']} initialisation ({len(done)} arrays)"
    if init.get("motion_modules", ""):
        n = load_motion_modules(model.denoiser, init.motion_modules)
        sources["denoiser"] += f" + {n} motion modules from {init.motion_modules}"
    for name, src in sources.items():
        (log.warning if src == "random" and weights_dir else log.info)("%s: %s", name, src)
    return model
