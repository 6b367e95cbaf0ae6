"""Which batches a run skips after a spike rollback, and the iterator that moves past them.

Batches are numbered by their position in the data stream: the n-th batch drawn from the
iterator is batch n (1-based), whether a step trained on it or it was skipped. A rollback adds
the positions of the window before the spike to the plan; from then on the cursor draws and
discards those batches when it reaches them, and records each in DIR/skipped_data.jsonl.

The plan lives in DIR/spike_rollbacks.json (written before the rollback restores anything), so
a resumed run skips exactly what the run that rolled back skipped: a checkpoint saved at step k
holds an iterator that has drawn `position_at(k)` batches, and positions are only ever added
beyond the restored checkpoint's (newer checkpoints are deleted by the rollback).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

from kinoe_jax.utils import atomic

log = logging.getLogger(__name__)

PLAN_FILE = "spike_rollbacks.json"
SKIPPED_FILE = "skipped_data.jsonl"


@dataclasses.dataclass
class SkipPlan:
    skipped: list[int] = dataclasses.field(default_factory=list)  # sorted batch positions
    lr_windows: list[list] = dataclasses.field(default_factory=list)  # [first step, last step, factor]
    rollbacks: list[dict] = dataclasses.field(default_factory=list)  # what each rollback saw and did
    first_seen: dict[int, int] = dataclasses.field(default_factory=dict)  # position -> step that trained on it

    @classmethod
    def load(cls, workdir: str) -> "SkipPlan":
        path = os.path.join(workdir, PLAN_FILE)
        if not os.path.exists(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
            return cls(sorted(int(p) for p in raw["skipped"]), [list(w) for w in raw["lr_windows"]],
                       list(raw["rollbacks"]), {int(k): int(v) for k, v in raw["first_seen"].items()})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e}); it lists the batches a spike "
                             "rollback skips, so the run cannot resume exactly without it") from e

    def save(self, workdir: str) -> None:
        atomic.write_json(os.path.join(workdir, PLAN_FILE),
                          {"skipped": self.skipped, "lr_windows": self.lr_windows, "rollbacks": self.rollbacks,
                           "first_seen": {str(k): v for k, v in sorted(self.first_seen.items())}}, indent=1)

    def position_at(self, step: int) -> int:
        """Batches drawn once `step` steps have run: each skipped position at or below the
        running count pushes it one further."""
        position = step
        for p in self.skipped:
            if p > position:
                break
            position += 1
        return position

    def skip(self, first: int, last: int, steps_of: dict[int, int]) -> list[int]:
        """Add positions first..last; returns those that are new."""
        known = set(self.skipped)
        new = [p for p in range(first, last + 1) if p not in known]
        for p in new:
            bisect.insort(self.skipped, p)
            if p in steps_of:
                self.first_seen[p] = steps_of[p]
        return new

    def lr_scale(self, step: int) -> float:
        """The factor on the learning rate of 0-based `step`."""
        scale = 1.0
        for first, last, factor in self.lr_windows:
            if first <= step <= last:
                scale *= factor
        return scale


class DataCursor:
    """Draws each step's batch, first drawing and discarding the planned skips."""

    def __init__(self, workdir: str, plan: SkipPlan, faults, primary: bool):
        self.path = os.path.join(workdir, SKIPPED_FILE)
        self.plan, self.faults, self.primary = plan, faults, primary
        self.position = 0
        self.recorded = self._recorded() if primary else set()

    def start(self, step: int) -> None:
        """The restored iterator has drawn the batches of steps 1..step and the skips among them."""
        self.position = self.plan.position_at(step)

    def next(self, step: int, train_data) -> dict[str, np.ndarray]:
        """The batch of 0-based `step`."""
        skipped = set(self.plan.skipped)
        while self.position + 1 in skipped:
            batch = train_data.next(step)
            self.position += 1
            self._record(step, self.position, batch)
        batch = train_data.next(step)
        self.position += 1
        return self.faults.poison_batch(batch, self.position)

    def _record(self, step: int, position: int, batch) -> None:
        log.info("step %d: skipping batch %d of the data stream (spike rollback)", step + 1, position)
        if not self.primary or position in self.recorded:
            return
        self.recorded.add(position)
        row = {"batch": position, "skipped_before_step": step + 1, "trained_at_step": self.plan.first_seen.get(position),
               "rollback": _rollback_of(self.plan, position), "fingerprint": fingerprint(batch)}
        with open(self.path, "a", encoding="utf-8") as f:  # append-only: a torn last line is the only risk
            f.write(json.dumps(row) + "\n")

    def _recorded(self) -> set[int]:
        if not os.path.exists(self.path):
            return set()
        with open(self.path, encoding="utf-8") as f:
            return {json.loads(line)["batch"] for line in f if line.strip().endswith("}")}


def _rollback_of(plan: SkipPlan, position: int) -> int | None:
    for i, r in enumerate(plan.rollbacks, 1):
        first, last = r["batches"]
        if first <= position <= last:
            return i
    return None


def fingerprint(batch: dict) -> str:
    """A short hash of this process's share of a batch: find it again in the data, compare runs."""
    h = hashlib.sha1()
    for key in sorted(batch):
        h.update(key.encode())
        h.update(np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()[:16]
