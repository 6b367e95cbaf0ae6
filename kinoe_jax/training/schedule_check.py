"""On resume, say so when the learning-rate schedule or the data phases are not the checkpoint's.

Extending a run (`train.total_steps` up) is legitimate, and is what WSD is for, but it silently
moves a cosine curve, a WSD decay and the step where the SFT data enters. Each checkpoint
records what its run was doing; a resumed run compares and prints one warning naming the change
and the learning rate of the next step before and after.
"""

from __future__ import annotations

import dataclasses
import logging

import gin

log = logging.getLogger(__name__)

_PREFIXES = ("train.total_steps", "make_optimizer.", "cosine_schedule.", "wsd_schedule.", "PhaseSchedule.")


def _bindings() -> dict[str, str]:
    out = {}
    for line in gin.config_str().splitlines():
        if "=" in line and line.startswith(_PREFIXES):
            key, value = (part.strip() for part in line.split("=", 1))
            out[key] = value
    return out


@dataclasses.dataclass
class ScheduleInfo:
    schedule: object  # step -> learning rate
    total_steps: int
    phase_starts: list[int]
    phase_names: list[str]
    bindings: dict[str, str]

    def at(self, step: int) -> dict:
        """What a checkpoint taken at `step` records."""
        return {"total_steps": self.total_steps, "next_learning_rate": float(self.schedule(step)),
                "phase_starts": self.phase_starts, "phase_names": self.phase_names, "bindings": self.bindings}


def describe_schedule(schedule, total_steps: int, data_iterator=None) -> ScheduleInfo:
    starts = list(getattr(data_iterator, "starts", ()) or ())
    names = list(getattr(data_iterator, "names", ()) or ())
    return ScheduleInfo(schedule, total_steps, [int(s) for s in starts], names, _bindings())


def changes(saved: dict, now: ScheduleInfo, step: int) -> list[str]:
    """What differs between the checkpoint's schedule and this run's, in words ([] if nothing)."""
    out = []
    if saved.get("total_steps") != now.total_steps:
        out.append(f"train.total_steps {saved.get('total_steps')} -> {now.total_steps}")
    old_b, new_b = saved.get("bindings", {}), now.bindings
    for key in sorted(set(old_b) | set(new_b)):
        if key != "train.total_steps" and old_b.get(key) != new_b.get(key):
            out.append(f"{key} {old_b.get(key, '(unset)')} -> {new_b.get(key, '(unset)')}")
    old_starts = saved.get("phase_starts", [])
    if old_starts != now.phase_starts:
        names = now.phase_names or saved.get("phase_names", [])
        for i, (was, is_) in enumerate(zip(old_starts, now.phase_starts)):
            if was != is_:
                out.append(f"data phase {i} ({names[i] if i < len(names) else '?'}) starts at step {is_} "
                           f"(was {was})")
        if len(old_starts) != len(now.phase_starts):
            out.append(f"data phases start at {now.phase_starts} (were {old_starts})")
    old_lr, new_lr = saved.get("next_learning_rate"), float(now.schedule(step))
    if old_lr is not None and abs(new_lr - old_lr) > 1e-12 + 1e-6 * abs(old_lr):
        out.append(f"learning rate of step {step + 1}: {old_lr:.4g} before, {new_lr:.4g} now")
    return out


def warn_if_changed(saved: dict | None, now: ScheduleInfo, step: int) -> list[str]:
    """Log one warning when the schedule changed; checkpoints older than this record say nothing."""
    if not saved:
        return []
    found = changes(saved, now, step)
    if found:
        if not any(x.startswith("learning rate") for x in found):  # say it even when unchanged
            found.append(f"learning rate of step {step + 1}: {float(now.schedule(step)):.4g} (unchanged)")
        log.warning("resuming at step %d under a changed schedule: %s (see docs/training.md, extending a run)",
                    step, "; ".join(found))
    return found
