"""Next-token cross-entropy: pretraining, and SFT (whose loss weights keep only the replies).

Batches are seqio's packed rows (kinoe_jax/data/pipeline.py); the loss is the weighted mean over
every weighted token of the step, whatever its micro-batch. The model gives log p(target) per
token straight from its LM head, which never holds all the logits (kinoe_jax/models/lm_head.py).
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp

from kinoe_jax.data import phases, pipeline
from kinoe_jax.training.objectives.base import Models, Objective, RunInfo, TrainData, aux_loss
from kinoe_jax.parallel import sharding as shd
from kinoe_jax.data import batch_checks


@gin.configurable("causal_lm")
class CausalLM(Objective):
    name = "causal_lm"
    batch_keys = pipeline.FEATURES
    progress_keys = {"loss": "loss", "tok/s": "tokens_per_sec"}

    def __init__(self):
        self._eval_batches: list = []
        self._eval_fn = None

    def setup(self, run: RunInfo) -> TrainData:
        iterator = phases.train_iterator(run.data, run.total_steps)  # one mixture, or a phase schedule
        self._eval_batches = pipeline.eval_batches(run.data) if run.eval_every else []
        return TrainData(next=lambda step: phases.next_batch(iterator, step), iterator=iterator)

    def check_first_batch(self, batch, run: RunInfo) -> None:
        batch_checks.check_batch(batch, vocab_size=run.model_config.vocab_size,
                               batch_size=pipeline.local_batch_size(run.data), seq_len=run.data.seq_len,
                               max_seq_len=run.model_config.max_seq_len)

    def batch_totals(self, batch) -> dict:
        return {"num_tokens": jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)}

    def loss(self, models: Models, params, micro, totals, num_micro, extra, rng):
        logp, aux = models.apply(params, micro["decoder_input_tokens"], micro["decoder_positions"],
                                 micro["decoder_segment_ids"], rng, targets=micro["decoder_target_tokens"])
        ce = -logp
        ce_sum = jnp.sum(ce * micro["decoder_loss_weights"].astype(jnp.float32))
        return ce_sum / totals["num_tokens"] + aux_loss(aux) / num_micro, {"ce_sum": ce_sum, **aux}

    def metrics(self, stats, totals) -> dict:
        out = {"loss": jnp.sum(stats["ce_sum"]) / totals["num_tokens"], "num_tokens": totals["num_tokens"]}
        out.update({k: jnp.mean(v, axis=0) for k, v in stats.items() if k != "ce_sum"})  # router stats
        return out

    def evaluate(self, run: RunInfo, models: Models, params, extra) -> dict[str, float]:
        """eval_loss: the token-weighted loss over the fixed validation batches."""
        if not self._eval_batches:
            return {}
        if self._eval_fn is None:
            def eval_step(params, batch):
                logp, _ = models.apply(params, batch["decoder_input_tokens"], batch["decoder_positions"],
                                       batch["decoder_segment_ids"], targets=batch["decoder_target_tokens"])
                w = batch["decoder_loss_weights"].astype(jnp.float32)
                return -jnp.sum(logp * w), jnp.sum(w)

            self._eval_fn = jax.jit(eval_step)
        first = self._eval_batches[0]["decoder_input_tokens"]
        spec = shd.batch_spec(run.mesh, (1, first.shape[0] * jax.process_count(), first.shape[1]))
        sharding = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(*spec[1:]))
        total = count = 0.0
        for batch in self._eval_batches:
            arrays = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
            s, n = self._eval_fn(params, arrays)
            total += float(s)
            count += float(n)
        return {"eval_loss": total / max(count, 1.0)}
