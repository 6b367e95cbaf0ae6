"""One optimizer step of any objective: gradients accumulated over micro-batches, a guarded update,
and the per-group statistics the spike detector reads (kinoe_jax/training/resilience/param_stats.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kinoe_jax.models import Transformer
from kinoe_jax.training.objectives import CausalLM
from kinoe_jax.training.objectives import trainable as trainable_lib
from kinoe_jax.training.objectives.base import Models
from kinoe_jax.training.resilience import Faults, skip_bad_update
from kinoe_jax.training.resilience.param_stats import ParamStatsConfig, step_stats


def make_models(model: Transformer) -> Models:
    """The forward passes an objective may call: the model, and its base with LoRA switched off."""

    def apply_with(module):
        def apply(params, tokens, positions, segment_ids, rng=None, targets=None):
            rngs = None if rng is None else {"dropout": rng}
            return module.apply({"params": params}, tokens, positions, segment_ids, targets, rngs=rngs)

        return apply

    lora = getattr(model.cfg, "lora", None)
    base = apply_with(Transformer(model.cfg, lora_enabled=False)) if lora is not None else None
    return Models(apply_with(model), base)


def make_train_step(model: Transformer, tx, schedule, objective=None, trainable=None, group_stats: bool | None = None):
    """One optimizer step of `objective` (default: the causal LM) over the trainable parameters.
    `group_stats` (None: gin's param_stats.enabled) adds the per-group statistics to the metrics."""
    objective = objective or CausalLM()
    trainable = trainable or trainable_lib.for_model(model.cfg)
    models = make_models(model)
    lora = getattr(model.cfg, "lora", None)
    dropout = lora is not None and lora.dropout > 0
    faults = Faults()  # fault injection for tests; off unless bound in gin
    group_stats = ParamStatsConfig().enabled if group_stats is None else group_stats

    def train_step(state, batch, loss_ceiling=np.inf, extra=None, lr_scale=1.0):
        """batch: every array [grad_accum, micro batch, ...]; `extra`: the objective's frozen inputs.

        A step with non-finite loss/gradients (or a loss above `loss_ceiling`) is not applied.
        `lr_scale` multiplies the update (AdamW's decoupled decay included): a lowered learning
        rate after a spike rollback, without recompiling or touching the schedule's state."""
        num_micro = jax.tree.leaves(batch)[0].shape[0]
        totals = objective.batch_totals(batch)
        params, frozen = trainable_lib.split(state["params"], trainable)
        step_rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(params, micro, rng):
            whole = trainable_lib.merge(params, frozen)  # gradients reach only `params`
            return objective.loss(models, whole, micro, totals, num_micro, extra, rng if dropout else None)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(grads, xs):
            micro, i = xs
            (_, stats), g = grad_fn(params, micro, jax.random.fold_in(step_rng, i))
            return jax.tree.map(jnp.add, grads, g), stats

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, stats = jax.lax.scan(micro_step, zeros, (batch, jnp.arange(num_micro)))
        grads = faults.poison_grads(grads, state["step"])

        def update():
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
            return trainable_lib.merge(optax.apply_updates(params, updates), frozen), opt_state

        metrics = objective.metrics(stats, totals)
        metrics.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]) * lr_scale)
        new_state, metrics = skip_bad_update(state, update, metrics, loss_ceiling)
        if group_stats:
            new_params = trainable_lib.split(new_state["params"], trainable)[0]
            metrics.update(step_stats(params, new_params, grads, new_state["opt_state"]))
        return new_state, metrics

    return train_step
