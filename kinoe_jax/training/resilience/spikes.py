"""The spike detector: a loss spike that stays finite and under the ceiling, or one that recovers
only partway, is told apart from the noise of a healthy run.

Two signals, each judged against a running window of applied steps:

  loss           z = (loss - expected) / max(spread, min_std), where `expected` is the window's
                 straight-line trend carried one step on and `spread` the std of the window
                 around that line: a falling loss (early training, a decay) neither hides a
                 spike in its own spread nor looks like one
  update ratio   (update_norm / param_norm) / learning_rate, against the window's mean: an Adam
                 update far larger than usual for its learning rate (it often comes first)

A step is anomalous when z > `loss_sigma` or the update ratio exceeds `ratio_factor` x its mean.
Anomalous steps stay out of the window, so a spike cannot raise its own bar. A spike is confirmed
when `confirm_steps` steps in a row are anomalous: one odd batch is the step guard's business
(and costs one update at most); a spike that persists is what a rollback is for. The defaults and
the measurements behind them are in docs/resilience.md.
"""

from __future__ import annotations

import collections
import dataclasses

import gin
import numpy as np


@dataclasses.dataclass(frozen=True)
class Spike:
    """A confirmed spike: `onset` is the first anomalous step, `step` the one that confirmed it."""

    onset: int
    step: int
    loss: float
    loss_expected: float
    loss_spread: float
    z: float
    ratio_factor: float  # the update ratio over its window mean (nan when unknown)
    window: int

    def describe(self) -> str:
        ratio = "" if np.isnan(self.ratio_factor) else f", update/param ratio {self.ratio_factor:.1f}x its mean"
        return (f"loss {self.loss:.4f} vs {self.loss_expected:.4f} ± {self.loss_spread:.4f} expected from the "
                f"last {self.window} steps (z {self.z:.1f}){ratio}, anomalous since step {self.onset}")


@gin.configurable
class SpikeDetector:
    def __init__(self, loss_sigma: float = 5.0, ratio_factor: float = 4.0, window: int = 100,
                 min_history: int = 30, min_std: float = 0.02, confirm_steps: int = 3):
        problems = []
        if loss_sigma <= 0:
            problems.append(f"SpikeDetector.loss_sigma must be > 0, got {loss_sigma}")
        if ratio_factor <= 1:
            problems.append(f"SpikeDetector.ratio_factor must be > 1, got {ratio_factor}")
        if not 2 <= min_history <= window:
            problems.append(f"SpikeDetector.min_history ({min_history}) must be in [2, window={window}]")
        if confirm_steps < 1:
            problems.append(f"SpikeDetector.confirm_steps must be >= 1, got {confirm_steps}")
        if problems:
            raise ValueError("; ".join(problems))
        self.loss_sigma, self.ratio_factor, self.min_history = loss_sigma, ratio_factor, min_history
        self.min_std, self.confirm_steps, self.window_size = min_std, confirm_steps, window
        self.reset()

    def reset(self) -> None:
        """Forget the window: after a restart (resume or rollback) both start alike."""
        self.losses: collections.deque[float] = collections.deque(maxlen=self.window_size)
        self.ratios: collections.deque[float] = collections.deque(maxlen=self.window_size)
        self.run: list[int] = []  # the anomalous steps in a row so far
        self.worst: Spike | None = None

    def observe(self, step: int, loss: float, update_ratio: float | None, learning_rate: float | None,
                skipped: bool = False) -> Spike | None:
        """One applied step's numbers; returns the spike it confirms, if any."""
        if skipped or not np.isfinite(loss):  # the step guard's case: no update was applied
            return None
        ratio = None
        if update_ratio is not None and learning_rate and learning_rate > 0 and np.isfinite(update_ratio):
            ratio = float(update_ratio) / float(learning_rate)
        if len(self.losses) < self.min_history:
            self._keep(loss, ratio)
            return None
        a = np.asarray(self.losses, np.float64)
        expected, spread = _trend(a)
        z = (loss - expected) / max(spread, self.min_std)
        factor = float("nan")
        if ratio is not None and self.ratios:
            factor = ratio / max(float(np.mean(self.ratios)), 1e-30)
        if z <= self.loss_sigma and not factor > self.ratio_factor:
            self.run, self.worst = [], None
            self._keep(loss, ratio)
            return None
        self.run.append(step)
        spike = Spike(self.run[0], step, float(loss), expected, spread, float(z), factor, len(a))
        if self.worst is None or spike.z > self.worst.z:
            self.worst = spike
        if len(self.run) < self.confirm_steps:
            return None
        confirmed = dataclasses.replace(self.worst, onset=self.run[0], step=step)
        self.run, self.worst = [], None
        return confirmed

    def _keep(self, loss: float, ratio: float | None) -> None:
        self.losses.append(float(loss))
        if ratio is not None:
            self.ratios.append(ratio)


def _trend(a: np.ndarray) -> tuple[float, float]:
    """The least-squares line through the window, one step past its end, and the std around it."""
    t = np.arange(len(a), dtype=np.float64)
    slope, intercept = np.polyfit(t, a, 1)
    return float(intercept + slope * len(a)), float(np.std(a - (intercept + slope * t)))
