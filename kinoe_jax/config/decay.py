"""When the learning rate starts to decay: the one rule the WSD schedule (kinoe_jax/training/optim.py)
and the data phases (kinoe_jax/data/phases.py) share, so that the SFT mixture enters exactly where
the decay begins."""

from __future__ import annotations

import gin

WSD_DECAY_FRACTION = 0.1  # wsd_schedule's default


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    return max(int(round(total_steps * decay_fraction)), 1)


def wsd_decay_start(total_steps: int, decay_fraction: float = WSD_DECAY_FRACTION) -> int:
    return total_steps - decay_steps(total_steps, decay_fraction)


def wsd_decay_fraction() -> float | None:
    """The decay fraction the gin-configured WSD schedule will use, or None when WSD is not in use."""
    try:
        schedule = gin.query_parameter("make_optimizer.schedule")
    except ValueError:
        return None
    configurable = getattr(schedule, "configurable", None)
    if getattr(configurable, "name", None) != "wsd_schedule":
        return None
    try:
        return float(gin.query_parameter("wsd_schedule.decay_fraction"))
    except ValueError:
        return WSD_DECAY_FRACTION
