"""What the training loop asks of an objective.

The loop (kinoe_jax/training/loop.py) owns everything objectives share: the mesh, the train state and its
checkpoints, gradient accumulation, the optimizer, skipping bad steps, preemption, the watchdog,
alerts, metrics, W&B and the progress bar. An objective says only

  - what its batch looks like      `setup()` -> TrainData: this process's batch for any step,
                                    every array [local batch, ...];
  - its loss and metrics           `loss()` on one micro-batch, `metrics()` over a step's;
  - its evaluation                 `evaluate()`;
  - which parameters it trains     `trainable()` (all, or only LoRA adapters);

plus what it needs besides the trained parameters (`frozen_inputs()`: DPO's reference model).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kinoe_jax.training.objectives import trainable as trainable_lib


@dataclasses.dataclass
class RunInfo:
    """The run as an objective sees it."""

    workdir: str
    model_config: Any  # ModelConfig
    data: Any  # DataConfig: seq_len, global_batch (per step, all processes), grad_accum
    total_steps: int
    eval_every: int
    seed: int
    mesh: jax.sharding.Mesh
    vocab: Any
    init_checkpoint: str | None = None  # load_params_from's directory, if the run starts from one
    init_step: int | None = None


@dataclasses.dataclass
class TrainData:
    """Where batches come from. `iterator` is checkpointed with the state (a tf.data iterator, so a
    resumed run reads exactly the batches it would have read); None when a step's batch follows
    from the step number alone."""

    next: Callable[[int], dict[str, np.ndarray]]  # 0-based step -> this process's batch
    iterator: Any = None


@dataclasses.dataclass(frozen=True)
class Models:
    """Forward passes the loss may use. `base` is the model with its LoRA adapters switched off
    (None without LoRA): the same parameters, so a frozen reference costs no second copy."""

    # (params, tokens, positions, segment_ids, rng=None, targets=None) -> (logits, aux), or with
    # targets (log p(target) per token, aux) without holding all the logits (models/lm_head.py).
    apply: Callable
    base: Callable | None = None


class Objective:
    name = "objective"
    batch_keys: tuple[str, ...] = ()  # the arrays of one batch, each [batch, seq_len] of int32
    progress_keys: dict[str, str] = {"loss": "loss"}  # progress bar label -> metric
    eval_at_start = False  # evaluate once before the first step of a fresh run

    def setup(self, run: RunInfo) -> TrainData:
        raise NotImplementedError

    def check_first_batch(self, batch: dict[str, np.ndarray], run: RunInfo) -> None:
        """Raise a clear error when the first batch is unusable (before the first compile)."""

    def frozen_inputs(self, run: RunInfo, abstract_params, param_shardings, restore_params):
        """(tree, shardings) passed unchanged to every step besides the state, or (None, None)."""
        return None, None

    def batch_totals(self, batch) -> dict:
        """Traced, over the step's whole batch [accum, micro, ...]: normalisers the loss needs."""
        return {}

    def loss(self, models: Models, params, micro, totals: dict, num_micro: int, extra, rng):
        """Traced, one micro-batch -> (its share of the step's objective, stats). The shares of a
        step's micro-batches add up to the objective; stats come back stacked over them."""
        raise NotImplementedError

    def metrics(self, stats: dict, totals: dict) -> dict:
        """Traced: the step's metrics from stacked stats; must include "loss"."""
        return {k: jnp.mean(v, axis=0) for k, v in stats.items()}

    def tokens_per_step(self, run: RunInfo) -> int:
        return run.data.global_batch * run.data.seq_len

    def flops_per_step(self, run: RunInfo) -> float:
        return run.model_config.flops_per_token(run.data.seq_len) * self.tokens_per_step(run)

    def rate_metrics(self, tokens_per_sec: float, run: RunInfo) -> dict:
        return {}

    def evaluate(self, run: RunInfo, models: Models, params, extra) -> dict[str, float]:
        return {}

    def trainable(self, run: RunInfo):
        return trainable_lib.for_model(run.model_config)


def aux_loss(aux: dict):
    """Model-reported auxiliary losses (MoE load balancing, z-loss) end in "_loss" and are
    already scaled by their coefficients; the other aux entries are only statistics."""
    return sum((jnp.mean(v) for k, v in aux.items() if k.endswith("_loss")), jnp.float32(0))
