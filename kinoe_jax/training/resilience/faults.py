"""Fault injection for the resilience tests. Every hook is off unless bound in gin, e.g.

    --gin_bindings='faults.nan_grad_at_step = 3'

Steps are numbered as in metrics.jsonl (the first step is 1).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


@gin.configurable("faults")
@dataclasses.dataclass(frozen=True)
class Faults:
    nan_grad_at_step: int | None = None  # that step's gradients become NaN (inside the jitted step)
    nan_grad_count: int = 1  # ... and those of the steps after it, this many in all
    drop_batch_at_step: int | None = None  # one batch is discarded before that step
    hang_at_step: int | None = None  # the host stalls for `hang_s` before that step
    hang_s: float = 3600.0
    step_delay_s: float = 0.0  # every step waits this long (lets a test act on a run mid-flight)
    slow_commit_from: int | None = None  # the n-th and later async saves wait before committing
    slow_commit_s: float = 60.0
    # Batches number `poison_batches_from` .. + count - 1 of the data stream (1-based, counted as
    # drawn, so skipped ones count too) get random targets: the loss spikes, yet stays finite.
    poison_batches_from: int | None = None
    poison_batches_count: int = 1
    # The process takes a preemption notice once it has run this many steps (counted in this
    # process, so the resumed run, which starts later, does not stop again at the same count).
    preempt_after_steps: int | None = None

    def poison_grads(self, grads, step):
        """Traced: NaN gradients from `nan_grad_at_step` (`step` is the state's 0-based counter)."""
        if self.nan_grad_at_step is None:
            return grads
        bad = (step + 1 >= self.nan_grad_at_step) & (step + 1 < self.nan_grad_at_step + self.nan_grad_count)
        return jax.tree.map(lambda g: jnp.where(bad, jnp.full_like(g, jnp.nan), g), grads)

    def before_step(self, step: int, train_data) -> None:
        """`train_data`: the objective's TrainData (kinoe_jax/training/objectives/base.py)."""
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if step == self.drop_batch_at_step:
            log.warning("fault injection: discarding one batch before step %d", step)
            train_data.next(step - 1)
        if step == self.hang_at_step:
            log.warning("fault injection: stalling %.0f s before step %d", self.hang_s, step)
            time.sleep(self.hang_s)

    def poison_batch(self, batch: dict, position: int) -> dict:
        """This process's batch, drawn as the `position`-th of the stream (host side, numpy)."""
        first = self.poison_batches_from
        if first is None or not first <= position < first + self.poison_batches_count:
            return batch
        log.warning("fault injection: random targets in batch %d", position)
        targets = np.asarray(batch["decoder_target_tokens"])
        noise = np.random.default_rng(position).integers(1, max(int(targets.max()), 1) + 1, targets.shape)
        return dict(batch, decoder_target_tokens=np.where(targets > 0, noise, targets).astype(targets.dtype))

    def async_options(self, async_save: bool):
        """Orbax AsyncOptions whose hook runs after the files are written, before the commit."""
        if self.slow_commit_from is None or not async_save:
            return None
        import orbax.checkpoint as ocp

        saves = itertools.count(1)
        delay, first = self.slow_commit_s, self.slow_commit_from

        def before_commit():
            if next(saves) >= first:
                log.warning("fault injection: holding an async checkpoint %.0f s before its commit", delay)
                time.sleep(delay)

        return ocp.AsyncOptions(post_finalization_callback=before_commit)
