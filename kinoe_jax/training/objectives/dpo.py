"""Direct Preference Optimization: prefer the chosen reply over the rejected one, relative to a
frozen reference model.

    reward(y) = beta * (log pi(y|x) - log ref(y|x))      (summed over the reply's tokens)
    loss      = -log sigmoid(reward(chosen) - reward(rejected))

The policy starts from the run's initial parameters (load_params_from: the SFT checkpoint). The
reference is that same model, frozen:
  - full fine-tuning: a second parameter tree restored from `dpo.reference_checkpoint`
    (default: load_params_from's checkpoint), passed to every step beside the state;
  - LoRA: the policy's own base with its adapters switched off. The base is frozen anyway, so
    the reference costs no second copy of the weights.

DataConfig.global_batch counts preference pairs per step (each pair is two sequences of
DataConfig.seq_len). A step's pairs follow from the step number alone (a fresh permutation per
epoch), so resuming needs no iterator state.
"""

from __future__ import annotations

import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kinoe_jax.utils.errors import ConfigError
from kinoe_jax.training.checkpoint import check_tokenizer
from kinoe_jax.data.vocab import BUILTIN_DIR
from kinoe_jax.training.objectives.base import Models, Objective, RunInfo, TrainData, aux_loss
from kinoe_jax.parallel import sharding as shd
from kinoe_jax.utils.errors import DataError
from kinoe_jax.data.chat.preference import ROW_KEYS, PreferenceData, load_pairs

log = logging.getLogger(__name__)

BUILTIN_PREFERENCES = os.path.join(BUILTIN_DIR, "sft", "preference.jsonl")


# ----------------------------------------------------------------------------- the formula
def sequence_logps(apply, params, batch: dict, prefix: str, rng=None):
    """Summed log-probability of each row's weighted tokens (the reply), and the model's aux."""
    logp, aux = apply(params, batch[f"{prefix}_inputs"], batch[f"{prefix}_positions"],
                      batch[f"{prefix}_segment_ids"], rng, targets=batch[f"{prefix}_targets"])
    return jnp.sum(logp * batch[f"{prefix}_weights"].astype(jnp.float32), axis=-1), aux


def pair_logps(apply, params, batch: dict, rng=None):
    """(chosen, rejected) log-probabilities in one forward pass over both halves."""
    both = {f"x_{k}": jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ROW_KEYS}
    logps, aux = sequence_logps(apply, params, both, "x", rng)
    n = batch["chosen_inputs"].shape[0]
    return logps[:n], logps[n:], aux


def dpo_terms(policy_c, policy_r, ref_c, ref_r, beta: float, label_smoothing: float):
    """Per-pair loss, rewards and accuracy. label_smoothing > 0 is conservative DPO (labels
    assumed flipped with that probability)."""
    chosen_reward = beta * (policy_c - ref_c)
    rejected_reward = beta * (policy_r - ref_r)
    margin = chosen_reward - rejected_reward
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin) - label_smoothing * jax.nn.log_sigmoid(-margin)
    return {"loss": loss, "reward_margin": margin, "preference_accuracy": (margin > 0).astype(jnp.float32),
            "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "chosen_logp": policy_c, "rejected_logp": policy_r}


def step_indices(step: int, global_batch: int, num_pairs: int, seed: int) -> np.ndarray:
    """The pairs of one step: consecutive slices of a fresh permutation per epoch, so any step's
    batch follows from the step number alone (resuming needs no iterator state)."""
    flat = np.arange(step * global_batch, (step + 1) * global_batch)
    epochs, offsets = np.divmod(flat, num_pairs)
    out = np.empty_like(flat)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_pairs)
        out[epochs == epoch] = perm[offsets[epochs == epoch]]
    return out


# ----------------------------------------------------------------------------- the objective
@gin.configurable("dpo")
class DPO(Objective):
    name = "dpo"
    batch_keys = tuple(f"{side}_{k}" for side in ("chosen", "rejected") for k in ROW_KEYS)
    progress_keys = {"loss": "loss", "acc": "preference_accuracy"}
    eval_at_start = True  # where the policy starts: the reference (loss log 2, margin 0)

    def __init__(self, train_pattern=None, eval_pattern=None, beta: float = 0.1, label_smoothing: float = 0.0,
                 reference_checkpoint: str | None = None, reference_step: int | None = None):
        if beta <= 0 or not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"dpo.beta = {beta} must be > 0 and dpo.label_smoothing = {label_smoothing} "
                              "in [0, 0.5)")
        self.train_pattern, self.eval_pattern = train_pattern, eval_pattern
        self.beta, self.label_smoothing = beta, label_smoothing
        self.reference_checkpoint, self.reference_step = reference_checkpoint, reference_step
        self._eval_fn = None

    # ---------------------------------------------------------------- data
    def setup(self, run: RunInfo) -> TrainData:
        if run.init_checkpoint is None and self.reference_checkpoint is None:
            raise ConfigError("DPO starts from a trained model: bind load_params_from.checkpoint_dir (the SFT "
                              "run's checkpoints)")
        if _has_lora(run) and self.reference_checkpoint is not None:
            raise ConfigError("with LoRA the DPO reference is the base model with its adapters switched off; "
                              "leave dpo.reference_checkpoint unbound (the base comes from load_params_from)")
        if self.reference_checkpoint:
            check_tokenizer(self.reference_checkpoint)
        self.data = _load(self.train_pattern or BUILTIN_PREFERENCES, run, "train")
        self.eval_data = _load(self.eval_pattern, run, "eval") if self.eval_pattern else self.data
        n_proc = jax.process_count()
        self.lo = jax.process_index() * run.data.global_batch // n_proc
        self.hi = self.lo + run.data.global_batch // n_proc
        self.global_batch = run.data.global_batch

        def batch_at(step: int):
            return self.data.take(step_indices(step, self.global_batch, len(self.data), run.seed)[self.lo:self.hi])

        return TrainData(next=batch_at)

    def check_first_batch(self, batch, run: RunInfo) -> None:
        vocab = run.model_config.vocab_size
        for key in ("chosen_inputs", "chosen_targets", "rejected_inputs", "rejected_targets"):
            bad = np.argwhere((batch[key] < 0) | (batch[key] >= vocab))
            if len(bad):
                r, c = bad[0]
                raise DataError(f"first DPO batch: {key}[{r}, {c}] = {batch[key][r, c]} is outside the "
                                f"vocabulary [0, {vocab}) (ModelConfig.vocab_size too small for the tokenizer?)")

    def frozen_inputs(self, run: RunInfo, abstract_params, param_shardings, restore_params):
        if _has_lora(run):
            return None, None  # the reference is the base inside the policy's own parameters
        directory = self.reference_checkpoint or run.init_checkpoint
        step = self.reference_step if self.reference_checkpoint else run.init_step
        return restore_params(directory, step), param_shardings

    # ---------------------------------------------------------------- the loss
    def _reference(self, models: Models, params, micro, extra):
        if extra is None:
            rc, rr, _ = pair_logps(models.base, params, micro)
        else:
            rc, rr, _ = pair_logps(models.apply, extra, micro)
        return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)

    def loss(self, models: Models, params, micro, totals, num_micro, extra, rng):
        pc, pr, aux = pair_logps(models.apply, params, micro, rng)
        rc, rr = self._reference(models, params, micro, extra)
        terms = dpo_terms(pc, pr, rc, rr, self.beta, self.label_smoothing)
        objective = (jnp.mean(terms["loss"]) + aux_loss(aux)) / num_micro
        return objective, {k: jnp.mean(v) for k, v in terms.items()}

    def tokens_per_step(self, run: RunInfo) -> int:
        return 2 * run.data.global_batch * run.data.seq_len  # chosen and rejected rows

    def flops_per_step(self, run: RunInfo) -> float:
        # The policy's forward and backward (6N) plus the reference's forward (2N) on every row.
        return super().flops_per_step(run) * 4.0 / 3.0

    def rate_metrics(self, tokens_per_sec: float, run: RunInfo) -> dict:
        return {"pairs_per_sec": tokens_per_sec / (2 * run.data.seq_len)}

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, run: RunInfo, models: Models, params, extra) -> dict[str, float]:
        """eval_loss, eval_reward_margin, eval_preference_accuracy over every pair of eval_pattern
        (default: the training pairs)."""
        if self._eval_fn is None:
            def eval_step(params, extra, batch):
                pc, pr, _ = pair_logps(models.apply, params, batch)
                rc, rr = self._reference(models, params, batch, extra)
                terms = dpo_terms(pc, pr, rc, rr, self.beta, self.label_smoothing)
                valid = batch["valid"].astype(jnp.float32)  # padding pairs of the last batch count for nothing
                sums = {k: jnp.sum(terms[k] * valid) for k in ("loss", "reward_margin", "preference_accuracy")}
                return sums, jnp.sum(valid)

            self._eval_fn = jax.jit(eval_step)
        data, gb = self.eval_data, self.global_batch
        spec = shd.batch_spec(run.mesh, (1, gb, run.data.seq_len))
        rows = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(*spec[1:]))
        pairs = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(spec[1]))
        totals: dict[str, float] = {}
        count = 0.0
        for start in range(0, len(data), gb):
            index = np.arange(start, start + gb)
            valid = index < len(data)
            batch = data.take(np.where(valid, index, 0)[self.lo:self.hi])
            batch["valid"] = valid[self.lo:self.hi].astype(np.int32)
            arrays = {k: jax.make_array_from_process_local_data(pairs if v.ndim == 1 else rows, v)
                      for k, v in batch.items()}
            sums, n = self._eval_fn(params, extra, arrays)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += float(n)
        return {f"eval_{k}": v / max(count, 1.0) for k, v in totals.items()}


def _has_lora(run: RunInfo) -> bool:
    return getattr(run.model_config, "lora", None) is not None


def _load(patterns, run: RunInfo, split: str) -> PreferenceData:
    data = load_pairs(patterns, run.data.seq_len, run.vocab, progress=jax.process_index() == 0)
    message = f"DPO {split} pairs (DataConfig.seq_len {run.data.seq_len}): {data.report.summary()}"
    if not len(data):
        raise DataError(message)
    if jax.process_index() == 0:
        (log.warning if data.report.skipped else log.info)(message)
    return data
