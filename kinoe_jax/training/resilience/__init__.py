"""A run that survives: preemption, bad steps, damaged checkpoints, stalls, full disks, and alerts
that reach the team. See docs/resilience.md."""

from kinoe_jax.training.resilience.faults import Faults
from kinoe_jax.training.resilience.guards import StepGuard, skip_bad_update
from kinoe_jax.training.resilience.run_guard import RunGuard, TrainingHalted

__all__ = ["Faults", "RunGuard", "StepGuard", "TrainingHalted", "skip_bad_update"]
