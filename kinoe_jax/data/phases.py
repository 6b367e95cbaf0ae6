"""The phase schedule: which mixture feeds which steps (MiniCPM: SFT data enters in the decay).

    train_iterator.schedule = @PhaseSchedule()
    PhaseSchedule.decay_mixture = "kinoe_ja_builtin_decay"   # DataConfig.mixture + the SFT tasks
    PhaseSchedule.decay_fraction = None                       # None: WSD's decay_fraction, else 0.2

Steps [0, switch) read DataConfig.mixture, steps [switch, total) read the decay mixture. With the
WSD schedule the switch is exactly kinoe_jax.config.decay.wsd_decay_start, the first step whose learning rate decays.

Both phases' tf.data iterators of a data shard live in one tf.Module, so the checkpoint's data_iter
item (one tf.train.Checkpoint(iterator=...) per shard) saves both and a resumed run, before or
after the switch, reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import logging

import gin
import jax
import tensorflow as tf

from kinoe_jax.config.decay import wsd_decay_fraction, wsd_decay_start
from kinoe_jax.data import pipeline, sources  # noqa: F401  (sources: gin configurables for data files)
from kinoe_jax.data.sharded_stream import ShardedStream

log = logging.getLogger(__name__)

DEFAULT_DECAY_FRACTION = 0.2


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PhaseSchedule:
    decay_mixture: str = gin.REQUIRED
    decay_fraction: float | None = None  # None: aligned with the WSD decay (0.2 without WSD)

    def fraction(self) -> float:
        if self.decay_fraction is not None:
            wsd = wsd_decay_fraction()
            if wsd is not None and wsd != self.decay_fraction:
                log.warning("PhaseSchedule.decay_fraction=%s differs from wsd_schedule.decay_fraction=%s: "
                            "the SFT mixture will not start with the learning-rate decay",
                            self.decay_fraction, wsd)
            f = self.decay_fraction
        else:
            f = wsd_decay_fraction()
            f = DEFAULT_DECAY_FRACTION if f is None else f
        if not 0 < f < 1:
            raise ValueError(f"PhaseSchedule: decay fraction must be in (0, 1), got {f}")
        return f

    def switch_step(self, total_steps: int) -> int:
        # The same rounding as the WSD schedule, so both turn at the same step.
        return wsd_decay_start(total_steps, self.fraction())


class PhasedIterator(tf.Module):
    """One tf.data iterator per phase; `next_for_step(step)` reads from the phase owning `step`."""

    def __init__(self, datasets: list[tf.data.Dataset], starts: list[int], names: list[str]):
        super().__init__(name="phased_iterator")
        if not starts or starts[0] != 0 or list(starts) != sorted(starts):
            raise ValueError(f"phase starts must begin at 0 and increase, got {starts}")
        self.starts = tuple(int(s) for s in starts)
        self.names = tuple(names)
        self.iterators = [iter(ds) for ds in datasets]  # tracked: checkpointed together
        self._current = None

    def phase_at(self, step: int) -> int:
        return max(i for i, s in enumerate(self.starts) if s <= step)

    def next_for_step(self, step: int):
        phase = self.phase_at(step)
        if phase != self._current:
            log.info("step %d: data phase %d, mixture %r", step, phase, self.names[phase])
            self._current = phase
        return next(self.iterators[phase])


@gin.configurable
def train_iterator(cfg: pipeline.DataConfig, total_steps: int, schedule: PhaseSchedule | None = None,
                   rows_by_process: dict[int, tuple[int, int]] | None = None):
    """The training stream (kinoe_jax/data/sharded_stream.py): per shard, a plain tf.data iterator,
    or a PhasedIterator under a schedule. `rows_by_process` defaults to equal blocks of every
    micro-batch's rows in process order (pipeline.rows_by_process gives those of a mesh)."""
    if rows_by_process is None:
        n, rows = jax.process_count(), pipeline.local_batch_size(cfg) // cfg.grad_accum
        rows_by_process = {p: (p * rows, (p + 1) * rows) for p in range(n)}
    names = [cfg.mixture] if schedule is None else [cfg.mixture, schedule.decay_mixture]
    starts = [0] if schedule is None else [0, schedule.switch_step(total_steps)]
    if schedule is not None:
        log.info("data phases: %r for steps [0, %d), %r for steps [%d, %d)", names[0], starts[1], names[1],
                 starts[1], total_steps)

    def make_shard(shard: int, num_shards: int):
        # Phase i shuffles with seed + i: the decay phase does not replay phase 0's first examples.
        datasets = [pipeline.train_dataset(dataclasses.replace(cfg, mixture=name, seed=cfg.seed + i), shard,
                                           num_shards) for i, name in enumerate(names)]
        return iter(datasets[0]) if schedule is None else PhasedIterator(datasets, starts, names)

    return ShardedStream(make_shard, cfg.global_batch, cfg.grad_accum, rows_by_process, jax.process_index(),
                         default_shards=cfg.data_shards or jax.process_count(),
                         starts=tuple(starts) if schedule is not None else (),
                         names=tuple(names) if schedule is not None else ())


def next_batch(data_iter, step: int):
    """The batch for `step` (0-based), whichever kind of iterator train_iterator built."""
    if hasattr(data_iter, "next_for_step"):
        return data_iter.next_for_step(step)
    return next(data_iter)
