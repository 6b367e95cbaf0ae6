"""The training stream of a run: a fixed number of seqio shards, whatever the number of processes.

A step's global batch is [grad_accum, global_batch / grad_accum, seq_len]. It is cut from
`num_shards` streams, each a seqio pipeline over ShardInfo(shard, num_shards) that yields
b = global_batch / num_shards rows per step: micro-batch m holds, shard after shard, rows
m*q .. (m+1)*q - 1 of each shard's b (q = b / grad_accum). So the rows of a step, and which
micro-batch each row is in, depend on the step and the shard count alone.

The shard count is fixed when a run starts (DataConfig.data_shards, else the process count then)
and every checkpoint keeps one iterator state per shard (`data_iter/shard_<i>-of-<n>`). A run
resumed on any number of processes continues the same global sequence: each process builds the
shards covering the rows its devices hold and restores their states, and for each shard the
lowest such process saves it. A process needing part of a shard reads all of it, so a run that
grew past its shard count reads more than it trains on (its log says how much).

Checkpoints older than this layout hold `process_<i>-of-<n>`: process i of n read exactly shard i
of n here (the same pipeline, the same rows in the same micro-batches), so they continue exactly
on any process count too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

import numpy as np

from kinoe_jax.utils.errors import ConfigError

log = logging.getLogger(__name__)

_SAVED = re.compile(r"^(shard|process)_(\d+)-of-(\d+)$")


def shard_dir(shard: int, num_shards: int) -> str:
    return f"shard_{shard}-of-{num_shards}"


def saved_shards(directory: str) -> tuple[int, dict[int, str]] | None:
    """(shard count, shard -> its directory name) of a checkpoint's data_iter item; None if empty."""
    if not os.path.isdir(directory):
        return None
    found = {}
    for name in os.listdir(directory):
        m = _SAVED.match(name)
        if m:
            found.setdefault(int(m.group(3)), {})[int(m.group(2))] = name
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{directory} holds data iterator states of {sorted(found)} shard counts at once")
    (count, shards), = found.items()
    return count, shards


def check_layout(global_batch: int, grad_accum: int, num_shards: int, source: str) -> None:
    """A shard count that cannot cut this run's batches the same way is refused in one line."""
    if num_shards < 1 or global_batch % num_shards or (global_batch // num_shards) % grad_accum:
        raise ConfigError(
            f"{source} cuts the training data into {num_shards} shard(s), which cannot give DataConfig.global_batch "
            f"= {global_batch} with DataConfig.grad_accum = {grad_accum} (global_batch must be a multiple of "
            f"shards x grad_accum = {num_shards * grad_accum})")


class ShardedStream:
    """This process's rows of every step, read from the shards that cover them.

    `make_shard(shard, num_shards)` builds one shard's checkpointable iterator: a tf.data iterator,
    or anything with `next_for_step(step)` (the phase schedule's). `rows` are this process's rows
    [first, end) of every micro-batch; `rows_by_process` all processes' (to know who saves what).
    """

    def __init__(self, make_shard: Callable[[int, int], object], global_batch: int, grad_accum: int,
                 rows_by_process: dict[int, tuple[int, int]], process: int, default_shards: int | None = None,
                 starts: tuple[int, ...] = (), names: tuple[str, ...] = ()):
        self.make_shard = make_shard
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.rows_by_process, self.process = rows_by_process, process
        self.rows = rows_by_process[process]
        self.default_shards = default_shards or len(rows_by_process)
        self.starts, self.names = tuple(starts), tuple(names)  # the phase schedule (schedule_check reads them)
        self.num_shards: int | None = None
        self.shards: dict[int, object] = {}
        self._started = False

    @property
    def local_rows(self) -> int:
        """Rows of a step this process holds, all micro-batches together."""
        return self.grad_accum * (self.rows[1] - self.rows[0])

    def _per_micro(self, num_shards: int) -> int:
        return self.global_batch // num_shards // self.grad_accum

    def _covering(self, rows: tuple[int, int], num_shards: int) -> range:
        q = self._per_micro(num_shards)
        return range(rows[0] // q, -(-rows[1] // q))

    def settle(self, num_shards: int | None = None,
               source: str = "DataConfig.data_shards (None: the process count)") -> None:
        """Fix the shard count (the checkpoint's, else the configured one) and build this process's shards."""
        num_shards = num_shards or self.num_shards or self.default_shards
        if num_shards == self.num_shards:
            return
        if self._started:
            raise RuntimeError(f"the data stream already runs on {self.num_shards} shards; it cannot change to "
                               f"{num_shards}")
        check_layout(self.global_batch, self.grad_accum, num_shards, source)
        self.num_shards = num_shards
        self.shards = {v: self.make_shard(v, num_shards) for v in self._covering(self.rows, num_shards)}
        read = len(self.shards) * self.global_batch // num_shards
        log.info("data: %d shard(s) of the training stream; this process reads shard(s) %s (%d rows a step) for "
                 "its %d rows", num_shards, list(self.shards), read, self.local_rows)

    def saves(self) -> list[int]:
        """The shards whose state this process writes: those it is the lowest reader of."""
        self.settle()
        return [v for v in self.shards
                if min(p for p, rows in self.rows_by_process.items() if v in self._covering(rows, self.num_shards))
                == self.process]

    def next_for_step(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of `step` (0-based), [grad_accum * rows, ...], micro-batch major."""
        self.settle()
        self._started = True
        parts = [_next(self.shards[v], step) for v in sorted(self.shards)]
        q, accum = self._per_micro(self.num_shards), self.grad_accum
        offset = self.rows[0] - min(self.shards) * q
        n = self.rows[1] - self.rows[0]
        out = {}
        for key in parts[0]:
            # [accum, q * shards, ...]: each shard's micro-batch m side by side, then this process's rows.
            whole = np.concatenate([np.asarray(p[key]).reshape((accum, q) + np.shape(p[key])[1:]) for p in parts],
                                   axis=1)
            out[key] = whole[:, offset:offset + n].reshape((accum * n,) + whole.shape[2:])
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str) -> None:
        # TensorFlow only where iterators are saved or restored: training/checkpoint.py imports
        # this module and itself loads without TensorFlow.
        import tensorflow as tf  # noqa: PLC0415

        for v in self.saves():
            path = os.path.join(directory, shard_dir(v, self.num_shards))
            os.makedirs(path, exist_ok=True)
            tf.train.Checkpoint(iterator=self.shards[v]).write(os.path.join(path, "iterator"))

    def restore(self, directory: str) -> None:
        """Continue from a checkpoint's data_iter item; one without states starts the stream over."""
        import tensorflow as tf  # noqa: PLC0415

        saved = saved_shards(directory)
        if saved is None:
            log.warning("no data iterator state in %s; the data stream starts from its beginning", directory)
            return
        count, names = saved
        self.settle(count, source=f"the checkpoint's data stream ({directory})")
        for v, shard in self.shards.items():
            if v not in names:
                raise FileNotFoundError(f"data iterator state of shard {v} of {count} is missing from {directory} "
                                        f"(saved: {sorted(names.values())})")
            tf.train.Checkpoint(iterator=shard).read(os.path.join(directory, names[v], "iterator")).assert_consumed()


def _next(shard, step: int):
    return shard.next_for_step(step) if hasattr(shard, "next_for_step") else next(shard)
