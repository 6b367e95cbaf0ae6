"""One optimizer step of any objective: gradients accumulated over micro-batches, a guarded update."""

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


def make_models(model: Transformer) -> Models:
    """The forward passes an objective may call: the model, and its base with LoRA switched off."""

    def apply_with(module):
        def apply(params, tokens, positions, segment_ids, rng=None):
            rngs = None if rng is None else {"dropout": rng}
            return module.apply({"params": params}, tokens, positions, segment_ids, rngs=rngs)

        return apply

    lora = getattr(model.cfg, "lora", None)
    base = apply_with(Transformer(model.cfg, lora_enabled=False)) if lora is not None else None
    return Models(apply_with(model), base)


def make_train_step(model: Transformer, tx, schedule, objective=None, trainable=None):
    """One optimizer step of `objective` (default: the causal LM) over the trainable parameters."""
    objective = objective or CausalLM()
    trainable = trainable or trainable_lib.for_model(model.cfg)
    models = make_models(model)
    lora = getattr(model.cfg, "lora", None)
    dropout = lora is not None and lora.dropout > 0
    faults = Faults()  # fault injection for tests; off unless bound in gin

    def train_step(state, batch, loss_ceiling=np.inf, extra=None):
        """batch: every array [grad_accum, micro batch, ...]; `extra`: the objective's frozen inputs.

        A step with non-finite loss/gradients (or a loss above `loss_ceiling`) is not applied."""
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
            return trainable_lib.merge(optax.apply_updates(params, updates), frozen), opt_state

        metrics = objective.metrics(stats, totals)
        metrics.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
        return skip_bad_update(state, update, metrics, loss_ceiling)

    return train_step
