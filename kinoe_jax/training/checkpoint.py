"""Orbax checkpoints: the train state, the tf.data iterator position, and the model config.

Layout of DIR/checkpoints/<step>/:
  state/        params, opt_state, step, rng (sharded arrays; restore onto any mesh)
  data_iter/    shard_<i>-of-<n>/  tf.data iterator state of each data shard (older checkpoints:
                process_<i>-of-<n>, which is the same shard); see kinoe_jax/data/sharded_stream.py
  model_config/ the ModelConfig as JSON (what the HF converter reads)
  run_info/     the schedule the run was on (total steps, next learning rate, data phases)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from etils import epath

from kinoe_jax.data.sharded_stream import ShardedStream, saved_shards, shard_dir
from kinoe_jax.training.orbax_reads import settled_reads
from kinoe_jax.training.resilience import integrity
from kinoe_jax.training.resilience.faults import Faults

log = logging.getLogger(__name__)


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves the training stream's shards with tf.train.Checkpoint (as T5X does, per shard)."""

    def save(self, directory: epath.Path, args: "DataIteratorArgs"):
        item = args.item
        if isinstance(item, ShardedStream):
            item.save(os.fspath(directory))
            return
        # A bare tf.data iterator is this process's shard of as many as there are processes.
        import tensorflow as tf  # only here: readers of checkpoints (HF export) need no TF

        path = directory / shard_dir(jax.process_index(), jax.process_count())
        path.mkdir(parents=True, exist_ok=True)
        tf.train.Checkpoint(iterator=item).write(os.fspath(path / "iterator"))

    def restore(self, directory: epath.Path, args: "DataIteratorArgs"):
        item = args.item
        if isinstance(item, ShardedStream):
            item.restore(os.fspath(directory))
            return item
        import tensorflow as tf

        saved = saved_shards(os.fspath(directory))
        name = saved and saved[0] == jax.process_count() and saved[1].get(jax.process_index())
        if not name:
            log.warning("no data iterator state for this process in %s; the data stream restarts from its "
                        "beginning", directory)
            return item
        tf.train.Checkpoint(iterator=item).read(os.fspath(directory / name / "iterator")).assert_consumed()
        return item


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class DataIteratorArgs(ocp.args.CheckpointArgs):
    item: Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 100
    keep: int = 3
    async_save: bool = True
    # Also keep, beyond `keep`, every checkpoint whose step is a multiple of this (None: off):
    # e.g. the last one before a WSD decay, to extend the run from it later.
    keep_period: int | None = None


def make_manager(directory: str, cfg: CheckpointConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.save_every, max_to_keep=cfg.keep, keep_period=cfg.keep_period,
        enable_async_checkpointing=cfg.async_save, create=True,
        async_options=Faults().async_options(cfg.async_save))  # a test hook: None unless bound in gin
    return ocp.CheckpointManager(epath.Path(directory).absolute(), options=options,
                                 item_names=("state", "data_iter", "model_config", "run_info"))


def save(manager: ocp.CheckpointManager, step: int, state, data_iter, model_config: dict,
         force: bool = False, run_info: dict | None = None) -> bool:
    items = {"state": ocp.args.StandardSave(state), "model_config": ocp.args.JsonSave(model_config)}
    if run_info is not None:  # the schedule it ran under (kinoe_jax/training/schedule_check.py)
        items["run_info"] = ocp.args.JsonSave(run_info)
    if data_iter is not None:
        items["data_iter"] = DataIteratorArgs(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iter=None):
    """Restore `step` onto the shardings carried by `abstract_state` (any mesh)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data_iter"] = DataIteratorArgs(data_iter)
    with settled_reads():  # a damaged checkpoint's failed reads end before the fallback moves on
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]


def restore_newest_good(manager: ocp.CheckpointManager, abstract_state, data_iter=None, notify=None):
    """(state, step) of the newest checkpoint that reads back whole, falling back past damaged ones
    (and saying so); raises rather than start from scratch when none can be read."""
    return integrity.restore_newest_good(manager, lambda step: restore(manager, step, abstract_state, data_iter),
                                         notify)


def check_data_layout(manager: ocp.CheckpointManager, stream) -> None:
    """Before anything runs: refuse, in one line, a newest checkpoint whose data stream this run
    cannot continue exactly, or a shard count that cannot cut a fresh one (kinoe_jax/data/sharded_stream.py)."""
    if not isinstance(stream, ShardedStream):
        return
    step = manager.latest_step()
    directory = os.path.join(os.fspath(manager.directory), str(step), "data_iter")
    saved = saved_shards(directory) if step is not None else None
    if saved is None:
        stream.settle()  # a fresh stream: DataConfig.data_shards is checked now
    else:
        stream.settle(saved[0], source=f"checkpoint step {step} ({directory})")


def newest_committed(checkpoints_dir: str) -> int | None:
    """The newest step whose save was committed (Orbax renames a step's directory when it is whole)."""
    try:
        names = os.listdir(checkpoints_dir)
    except OSError:
        return None
    steps = [int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(checkpoints_dir, n))]
    return max(steps, default=None)


def read_run_info(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The run_info a checkpoint recorded, or None (older checkpoints have none)."""
    import json

    path = epath.Path(manager.directory) / str(step) / "run_info" / "metadata"
    return json.loads(path.read_text()) if path.exists() else None


def check_tokenizer(checkpoint_dir: str) -> None:
    """A run's workdir carries the tokenizer it trained with: starting from its checkpoints with
    another tokenizer would silently scramble every token."""
    import filecmp

    from kinoe_jax.data.vocab import tokenizer_path

    checkpoint_dir = os.path.abspath(checkpoint_dir).rstrip("/")
    for candidate in (os.path.dirname(checkpoint_dir), checkpoint_dir):
        tok = os.path.join(candidate, "tokenizer.model")
        if os.path.exists(tok):
            if not filecmp.cmp(tok, tokenizer_path(), shallow=False):
                from kinoe_jax.utils.errors import ConfigError

                raise ConfigError(f"{checkpoint_dir} was trained with {tok}, which differs from the tokenizer "
                                  f"configured here ({tokenizer_path()}); bind tokenizer_path.path = '{tok}'")
            return
