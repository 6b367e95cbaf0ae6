"""Preemption: SLURM, Kubernetes and TPU maintenance send SIGTERM, then kill after a grace period.

The run finishes its current step, saves, waits for the commit and exits 0. Every process must
stop at the same step (a checkpoint save is collective):

* multi-process with JAX's preemption service (on by default after `jax.distributed.initialize`):
  the service owns SIGTERM, spreads the notice to every process and picks a common step; Orbax's
  `CheckpointManager.reached_preemption(step)` reports it, so it is called at every step;
* one process: a Python SIGTERM handler sets a flag;
* multi-process with the service disabled: the same handler, and the flags are OR-ed across
  processes at every step.
"""

from __future__ import annotations

import logging
import signal

import gin
import jax
import numpy as np

log = logging.getLogger(__name__)


def jax_preemption_service_active() -> bool:
    return jax.process_count() > 1 and bool(getattr(jax.config, "jax_enable_preemption_service", True))


@gin.configurable
class PreemptionGuard:
    def __init__(self, manager=None, signals: tuple[str, ...] = ("SIGTERM",)):
        self.manager = manager
        self.signals = tuple(signals)
        self.requested_locally = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._use_service = False

    def install(self) -> None:
        self._use_service = jax_preemption_service_active()
        if self._use_service:
            log.info("preemption: JAX's preemption service handles %s across %d processes",
                     "/".join(self.signals), jax.process_count())
            return
        for name in self.signals:
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. an embedding application's worker)
                log.warning("preemption: cannot handle %s outside the main thread; a %s kills the run "
                            "without a final checkpoint", name, name)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested_locally:
            log.warning("preemption: %s again; still finishing the step and saving", name)
            return
        self.requested_locally = True
        self.signal_name = name
        log.warning("preemption: %s received; finishing this step, saving a checkpoint, then exiting", name)

    def requested(self, step: int) -> bool:
        """True on every process at the same step once any process has been told to stop.

        Call it at every step, on every process."""
        if self._use_service:
            return bool(self._orbax_sync_point(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self.requested_locally))
            return bool(np.max(flags))
        return self.requested_locally

    def _orbax_sync_point(self, step: int) -> bool:
        if self.manager is not None:
            return self.manager.reached_preemption(step)
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the service is not running
            return False
