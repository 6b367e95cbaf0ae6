"""Orbax checkpoints one array (or one slice of an array) at a time.

Reading: the exporter opens each parameter of DIR/checkpoints/<step>/state with tensorstore and
reads only the rows it needs, never the optimizer state. Writing: the importer hands Orbax a tree
of `LazyArray`s; `LazyArrayHandler` materialises each one piece by piece (one decoder layer, or
one expert of one layer) into chunks of exactly that piece, so memory holds one HF tensor. What
lands on disk is an ordinary Orbax checkpoint: train.py resumes from it and
`load_params_from.checkpoint_dir` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import future as ocp_future

from kinoe_jax.models.stored import read_model_config
from kinoe_jax.hf.mapping import ConversionError


# ----------------------------------------------------------------------------- reading
class CheckpointReader:
    """The params of one step of a kinoe training checkpoint, readable leaf by leaf."""

    def __init__(self, checkpoint_dir: str, step: int | None = None):
        # Orbax finds no tree metadata under a relative path (it then returns None silently).
        checkpoint_dir = os.path.abspath(checkpoint_dir)
        if not os.path.isdir(checkpoint_dir):
            raise ConversionError(f"checkpoint directory {checkpoint_dir} does not exist")
        try:
            self.step, self.model_config = read_model_config(checkpoint_dir, step)
        except FileNotFoundError as e:
            raise ConversionError(str(e)) from e
        except json.JSONDecodeError as e:
            raise ConversionError(f"{checkpoint_dir}/{step}/model_config is not valid JSON: {e}") from e
        self.state_dir = epath.Path(checkpoint_dir) / str(self.step) / "state"
        meta_file = self.state_dir / "_METADATA"
        if not meta_file.exists():
            raise ConversionError(f"{meta_file} missing: checkpoint step {self.step} is incomplete or corrupted")
        try:
            raw = json.loads(meta_file.read_text())
            tree = ocp.PyTreeCheckpointer().metadata(self.state_dir).item_metadata.tree
        except Exception as e:  # noqa: BLE001 - Orbax raises many kinds; all mean the same to the user
            raise ConversionError(f"{self.state_dir}: unreadable Orbax metadata ({type(e).__name__}: {e})") from e
        if "params" not in tree:
            raise ConversionError(f"{self.state_dir} has no params (items: {sorted(tree)})")
        self._use_zarr3 = bool(raw.get("use_zarr3", False))
        self._use_ocdbt = bool(raw.get("use_ocdbt", True))
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        flat = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
        self.leaves = {tuple(str(k.key) for k in path): m for path, m in flat}
        self._open: dict = {}

    def shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        return {path: tuple(m.shape) for path, m in self.leaves.items()}

    def nbytes(self, leaf: tuple[str, ...]) -> int:
        m = self.leaves[leaf]
        return int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize

    def _store(self, leaf):
        if leaf not in self._open:
            info = ocp.type_handlers.ParamInfo(name=self.leaves[leaf].name, parent_dir=self.state_dir,
                                               ts_context=self._context,
                                               is_ocdbt_checkpoint=self._use_ocdbt, use_zarr3=self._use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._use_ocdbt)
            # One leaf open at a time: its chunk cache is dropped when the next leaf is opened.
            self._open = {leaf: ts.open(spec, open=True, read=True, context=self._context).result()}
        return self._open[leaf]

    def read(self, leaf: tuple[str, ...], start: int | None = None, stop: int | None = None) -> np.ndarray:
        """The whole leaf, or rows start:stop of its leading (layer) axis."""
        try:
            store = self._store(leaf)
            view = store if start is None else store[start:stop]
            return np.asarray(view.read().result())
        except Exception as e:  # noqa: BLE001 - tensorstore reports data loss as plain errors
            raise ConversionError(f"{self.state_dir}: cannot read {'/'.join(leaf)} "
                                  f"(truncated or corrupted checkpoint?): {e}") from e


# ----------------------------------------------------------------------------- writing
@dataclasses.dataclass
class LazyArray:
    """An array produced piece by piece: `pieces` yields (index into the leading axes, loader).

    All pieces index the same number of leading axes; each loader returns the array
    shape[len(index):]. With no leading axes there is a single piece: the whole array.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    depth: int
    pieces: Callable[[], Iterable[tuple[tuple[int, ...], Callable[[], np.ndarray]]]]

    @classmethod
    def zeros(cls, shape, dtype, depth: int) -> "LazyArray":
        shape, dtype = tuple(shape), np.dtype(dtype)

        def pieces():
            for index in np.ndindex(*shape[:depth]):
                yield tuple(index), lambda: np.zeros(shape[depth:], dtype)

        return cls(shape, dtype, depth, pieces)

    @classmethod
    def constant(cls, value: np.ndarray) -> "LazyArray":
        value = np.asarray(value)
        return cls(value.shape, value.dtype, 0, lambda: [((), lambda: value)])


class LazyArrayHandler(ocp.type_handlers.NumpyHandler):
    """Saves LazyArrays as the plain numpy arrays Orbax restores, one piece in memory at a time."""

    async def _write_all(self, values, infos, args):
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            chunk = (1,) * value.depth + value.shape[value.depth:]
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=chunk,
                dtype=value.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            for index, load in value.pieces():
                piece = np.asarray(load())
                if piece.shape != value.shape[value.depth:]:
                    raise ConversionError(f"{info.name}{list(index)}: got shape {piece.shape}, "
                                          f"expected {value.shape[value.depth:]}")
                target = store[index] if index else store
                await target.write(piece.astype(value.dtype, copy=False))
                del piece

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        return [ocp_future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                                 name="kinoe_lazy_array")]


def _registry():
    # jax.Array is never saved here; registering it only keeps Orbax from warning about its absence.
    return ocp.type_handlers.create_type_handler_registry((LazyArray, LazyArrayHandler()),
                                                          (jax.Array, ocp.type_handlers.ArrayHandler()))


def write_checkpoint(checkpoints_dir: str, step: int, state: dict, model_config: dict) -> None:
    """DIR/checkpoints/<step>/{state, model_config, data_iter} from a tree of LazyArrays."""
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(
        epath.Path(checkpoints_dir).absolute(), options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_registry()),
                       "model_config": ocp.JsonCheckpointHandler()})
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                               model_config=ocp.args.JsonSave(model_config)))
    manager.wait_until_finished()
    manager.close()
    # train.py restores the data iterator with the state; an empty item makes it start the data
    # stream from the beginning (it logs that) instead of failing on a missing item.
    os.makedirs(os.path.join(checkpoints_dir, str(step), "data_iter"), exist_ok=True)


def nest(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def load_params(reader: CheckpointReader, cast=None) -> dict:
    """The whole params tree as numpy arrays (for verification; the converters never do this)."""
    return nest({leaf: (reader.read(leaf) if cast is None else cast(reader.read(leaf))) for leaf in reader.leaves})
