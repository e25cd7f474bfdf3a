"""Orbax checkpoints of a training run: state, data-iterator state and metadata, per step.

A step directory holds three items (Orbax ``Composite``)::

    <dir>/<step>/state/      the TrainState pytree (``StandardSave``; sharded arrays, OCDBT)
    <dir>/<step>/data_iter/  process_<i>-of-<n>.json: each process's data-iterator state
    <dir>/<step>/metadata/   one JSON document (config, wall time, ...), written by process 0

Saves are asynchronous (the arrays are copied to host, then written in the background); ``wait()``
blocks until the last one is on disk. Orbax writes into a temporary directory and publishes it only
when complete (an atomic rename on POSIX file systems, a commit marker on object stores), and lists
only published steps, so a run killed mid-save resumes from the previous complete checkpoint.

Restores take a target whose leaves carry shardings (``anim_jax.train.state.abstract_like`` or
``abstract_train_state``): arrays are read straight into that placement, whatever mesh wrote them.

The iterator state is any JSON-serialisable value (Grain's ``DatasetIterator.get_state()`` is a
dict), stored per process because each host reads its own shard of the data; this module does not
depend on Grain.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from anim_jax import storage
from anim_jax.train.state import TrainState, abstract_like

STATE, DATA_ITER, METADATA = "state", "data_iter", "metadata"


# --------------------------------------------------------------------------------------------
# A per-process JSON item (the data-iterator state)
# --------------------------------------------------------------------------------------------


def _process_file(directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class ProcessJsonHandler(ocp.CheckpointHandler):
    """Every process writes (and reads back) its own JSON document."""

    def save(self, directory: epath.Path, args: "ProcessJsonSave"):
        _process_file(directory).write_text(json.dumps({"value": args.value}))

    def restore(self, directory: epath.Path, args: "ProcessJsonRestore | None" = None):
        f = _process_file(directory)
        if not f.exists():
            raise FileNotFoundError(
                f"{f} does not exist: the checkpoint was written by a different number of processes"
            )
        return json.loads(f.read_text())["value"]

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    value: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class Restored(NamedTuple):
    step: int
    state: Any
    data_iterator_state: Any
    metadata: dict


class CheckpointManager:
    """``orbax.checkpoint.CheckpointManager`` for a ``TrainState`` (or any pytree).

    ``include_frozen=False`` leaves the frozen parameters out of the checkpoint (they come from
    their own pretrained files); a restore then takes them from the (concrete) target state.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        include_frozen: bool = True,
    ):
        # Orbax writes gs:// itself (TensorStore for arrays, epath for the rest).
        self.directory = epath.Path(storage.absolute(directory))
        self.include_frozen = include_frozen
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
            # Write in place and publish with a commit marker: the same protocol on local disks,
            # network file systems and object stores; a step without the marker is invisible.
            atomicity_options=ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE),
        )
        self._mngr = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE, DATA_ITER, METADATA),
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA_ITER: ProcessJsonHandler(),
                METADATA: ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    # -- queries ------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    # -- save / restore ----------------------------------------------------------------------

    def save(
        self,
        step: int,
        state,
        data_iterator_state: Any = None,
        metadata: dict | None = None,
    ) -> bool:
        """Starts saving ``state`` as ``step`` (returns at once when async); False if that step
        already exists. ``data_iterator_state`` and ``metadata`` must be JSON-serialisable."""
        step = int(step)
        if step in self._mngr.all_steps():
            return False
        items = state.checkpoint_items(self.include_frozen) if isinstance(state, TrainState) else state
        json.dumps(data_iterator_state)  # fail here, not in a background thread
        return self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardSave(items),
                    DATA_ITER: ProcessJsonSave(data_iterator_state),
                    METADATA: ocp.args.JsonSave(dict(metadata or {})),
                }
            ),
            force=True,
        )

    def restore(self, step: int | None = None, target=None, *, data_iterator: bool = True) -> Restored:
        """Restores ``step`` (default: the latest) onto ``target``'s shapes, dtypes and shardings.

        ``target``: a ``TrainState`` (concrete or abstract, e.g. ``abstract_like(state)``) or any
        pytree of arrays / ``ShapeDtypeStruct``s; ``None`` restores with the saved shardings
        (only onto the same topology). Returns ``Restored(step, state, data_iterator_state,
        metadata)``; for a ``TrainState`` target, ``state`` is a ``TrainState``. The iterator state
        is this process's; a checkpoint written by a different number of processes can only be
        restored with ``data_iterator=False`` (its ``data_iterator_state`` is then None).
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        is_state = isinstance(target, TrainState)
        if is_state and not self.include_frozen and _is_abstract(target.frozen):
            raise ValueError("frozen parameters are not checkpointed: pass a concrete target state")
        items = target.checkpoint_items(self.include_frozen) if is_state else target
        args = {
            STATE: ocp.args.StandardRestore(abstract_like(items) if items is not None else None),
            METADATA: ocp.args.JsonRestore(),
        }
        if data_iterator:
            args[DATA_ITER] = ProcessJsonRestore()
        r = self._mngr.restore(int(step), args=ocp.args.Composite(**args))
        state = target.replace_items(r[STATE]) if is_state else r[STATE]
        return Restored(int(step), state, r[DATA_ITER] if data_iterator else None, dict(r[METADATA] or {}))

    def delete(self, step: int) -> None:
        """Removes checkpoint ``step`` (after any save in flight); every process must call it."""
        self.wait()
        self._mngr.delete(int(step))

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _is_abstract(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
