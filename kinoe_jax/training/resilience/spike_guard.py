"""What a confirmed loss spike sets off: roll back to the newest checkpoint before it, skip the
data window that preceded it, optionally lower the learning rate for a while, and alert. Past
`max_rollbacks` the run halts with a one-line verdict instead.

The training loop sees three calls (through RunGuard): `next_batch` (the cursor past skipped
batches), `lr_scale` (the factor for a step), and `rollback_target` (a checkpoint step to go back
to, or None); after restoring it says `rolled_back(step)`.
"""

from __future__ import annotations

import json
import logging
import os

import gin
import numpy as np

from kinoe_jax.training.resilience.data_skip import DataCursor, SkipPlan
from kinoe_jax.training.resilience.spikes import Spike, SpikeDetector
from kinoe_jax.utils import atomic

log = logging.getLogger(__name__)

ROLLED_BACK_METRICS = "rolled_back_metrics.jsonl"


@gin.configurable
class SpikeRollback:
    def __init__(self, enabled: bool = True, max_rollbacks: int = 3, skip_before: int = 10, skip_after: int = 0,
                 lr_factor: float = 1.0, lr_steps: int = 0):
        problems = []
        if max_rollbacks < 0:
            problems.append(f"SpikeRollback.max_rollbacks must be >= 0, got {max_rollbacks}")
        if skip_before < 0 or skip_after < 0:
            problems.append(f"SpikeRollback.skip_before / skip_after must be >= 0, got {skip_before} / {skip_after}")
        if not 0 < lr_factor <= 1:
            problems.append(f"SpikeRollback.lr_factor must be in (0, 1], got {lr_factor}")
        if lr_steps < 0:
            problems.append(f"SpikeRollback.lr_steps must be >= 0, got {lr_steps}")
        if problems:
            raise ValueError("; ".join(problems))
        self.enabled, self.max_rollbacks = enabled, max_rollbacks
        self.skip_before, self.skip_after = skip_before, skip_after
        self.lr_factor, self.lr_steps = lr_factor, lr_steps


class SpikeGuard:
    def __init__(self, workdir: str, manager, alerts, faults, primary: bool):
        self.workdir, self.manager, self.alerts, self.primary = workdir, manager, alerts, primary
        self.detector = SpikeDetector()
        self.policy = SpikeRollback()
        self.plan = SkipPlan.load(workdir)
        self.cursor = DataCursor(workdir, self.plan, faults, primary)
        self.confirmed: Spike | None = None
        self.verdict: str | None = None  # set when the run must halt
        self.drawn = 0  # the last step whose batch was drawn

    def start(self, step: int) -> None:
        self.cursor.start(step)
        self.detector.reset()
        self.confirmed, self.drawn = None, step

    def next_batch(self, step: int, train_data):
        self.drawn = step + 1
        return self.cursor.next(step, train_data)

    def lr_scale(self, step: int) -> np.float32:
        return np.float32(self.plan.lr_scale(step))

    def observe(self, step: int, loss: float, update_ratio, learning_rate, skipped: bool) -> None:
        spike = self.detector.observe(step, loss, update_ratio, learning_rate, skipped)
        if spike is not None and self.confirmed is None:
            self.confirmed = spike

    @property
    def rollbacks(self) -> int:
        return len(self.plan.rollbacks)

    def rollback_target(self) -> int | None:
        """After a confirmed spike: the checkpoint step to restore (the plan is saved first), or
        None (no spike, rollbacks off, no checkpoint before it, or the run must halt: `verdict`)."""
        spike, self.confirmed = self.confirmed, None
        if spike is None:
            return None
        where = f"step {spike.step}: loss spike confirmed ({spike.describe()})"
        if not self.policy.enabled:
            self.alerts.send("spike", "loss spike confirmed", where + "; SpikeRollback.enabled is False: "
                             "no action", "WARN", spike.step)
            return None
        if self.rollbacks >= self.policy.max_rollbacks:
            self.verdict = (f"{where}; {self.rollbacks} rollbacks already (SpikeRollback.max_rollbacks = "
                            f"{self.policy.max_rollbacks}): the spikes come back, so the cause is not a few "
                            f"batches; lower the learning rate or look at the batches in {self.cursor.path}")
            self.alerts.send("halt", "run halted: loss spikes keep coming", self.verdict, "ERROR", spike.step)
            return None
        before = [s for s in self.manager.all_steps() if s < spike.onset]
        if not before:
            self.alerts.send("spike", "loss spike: no checkpoint to roll back to",
                             where + "; no checkpoint precedes it, so the run continues", "WARN", spike.step)
            return None
        to_step = max(before)
        self._plan_rollback(spike, to_step)
        return to_step

    def rolled_back(self, step: int) -> None:
        """After the checkpoint `step` is restored: the cursor and the detector restart there."""
        self.start(step)
        if self.primary:
            _set_aside_metrics(self.workdir, step, self.rollbacks)

    def _plan_rollback(self, spike: Spike, to_step: int) -> None:
        policy, plan = self.policy, self.plan
        first_step = max(to_step + 1, spike.onset - policy.skip_before)
        steps_of = {plan.position_at(t): t for t in range(first_step, self.drawn + 1)}
        first, last = plan.position_at(first_step - 1) + 1, plan.position_at(self.drawn) + policy.skip_after
        new = plan.skip(first, last, steps_of)
        lowered = ""
        if policy.lr_factor < 1 and policy.lr_steps:
            plan.lr_windows.append([to_step, to_step + policy.lr_steps - 1, policy.lr_factor])
            lowered = (f"; learning rate x{policy.lr_factor:g} for steps {to_step + 1}-"
                       f"{to_step + policy.lr_steps}")
        plan.rollbacks.append({
            "detected_at_step": spike.step, "onset_step": spike.onset, "to_checkpoint": to_step,
            "batches": [first, last], "new_batches": len(new), "loss": spike.loss, "loss_expected": spike.loss_expected,
            "loss_spread": spike.loss_spread, "z": spike.z,
            "update_ratio_factor": None if np.isnan(spike.ratio_factor) else spike.ratio_factor})
        self.manager.wait_until_finished()
        for s in self.manager.all_steps():  # they hold the spike: a resume must not pick them
            if s > to_step:
                self.manager.delete(s)
        if self.primary:  # after the deletions: a crash in between resumes before the spike, unplanned
            plan.save(self.workdir)
        text = (f"step {spike.step}: loss spike confirmed ({spike.describe()}); rolled back to checkpoint step "
                f"{to_step}; skipping batches {first}-{last} of the data stream ({len(new)} new, recorded in "
                f"{self.cursor.path}){lowered}; rollback {self.rollbacks} of at most {policy.max_rollbacks}")
        self.alerts.send("rollback", "loss spike: rolled back", text, "WARN", spike.step)


def _set_aside_metrics(workdir: str, step: int, rollback: int) -> None:
    """metrics.jsonl keeps the timeline that continues; the rows after `step` move to
    DIR/rolled_back_metrics.jsonl (marked with the rollback's number) for the forensics."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in rows if r["step"] <= step]
    gone = [dict(r, rollback=rollback) for r in rows if r["step"] > step]
    with open(os.path.join(workdir, ROLLED_BACK_METRICS), "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in gone))
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
