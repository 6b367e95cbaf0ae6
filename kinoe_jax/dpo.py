"""Direct Preference Optimization (DPO) from an SFT checkpoint.

    python -m kinoe_jax.dpo --gin_file=gin_configs/runs/dpo_tiny_ja.gin --workdir=DIR

The policy starts as a copy of the reference (the SFT checkpoint), which stays frozen; both live
on the device mesh with the training state's shardings. Each step scores the chosen and the
rejected reply of every pair under both models:

    reward(y) = beta * (log pi(y|x) - log ref(y|x))      (summed over the reply's tokens)
    loss      = -log sigmoid(reward(chosen) - reward(rejected))

DIR gets metrics.jsonl (loss, reward_margin, preference_accuracy, ...), Orbax checkpoints in the
training layout (so generate and the HF converter read them), config.gin and tokenizer.model.
Running the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import logging
import os
import sys
import time

import kinoe_jax.data  # noqa: F401  (hides accelerators from TensorFlow before anything else)

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kinoe_jax import checkpoint as ckpt
from kinoe_jax import optim
from kinoe_jax import train as train_lib
from kinoe_jax.config_io import load_gin, write_operative_config
from kinoe_jax.data.vocab import BUILTIN_DIR, get_vocabulary, tokenizer_path
from kinoe_jax.metrics import MetricsWriter, plot_loss
from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.parallel import sharding as shd
from kinoe_jax.parallel.mesh import make_mesh
from kinoe_jax.parallel.rules import flax_rules
from kinoe_jax.sft.preference import PreferenceData, load_pairs

log = logging.getLogger("kinoe_jax.dpo")

BUILTIN_PREFERENCES = os.path.join(BUILTIN_DIR, "sft", "preference.jsonl")


# ----------------------------------------------------------------------------- the loss
def sequence_logps(model: Transformer, params, batch: dict, prefix: str):
    """Summed log-probability of each row's weighted tokens (the reply), and the model's aux."""
    logits, aux = model.apply({"params": params}, batch[f"{prefix}_inputs"], batch[f"{prefix}_positions"],
                              batch[f"{prefix}_segment_ids"])
    logp = -optax.softmax_cross_entropy_with_integer_labels(logits, batch[f"{prefix}_targets"])
    return jnp.sum(logp * batch[f"{prefix}_weights"].astype(jnp.float32), axis=-1), aux


def pair_logps(model: Transformer, params, batch: dict):
    """(chosen, rejected) log-probabilities in one forward pass over both halves."""
    keys = ("inputs", "targets", "weights", "segment_ids", "positions")
    both = {f"x_{k}": jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}
    logps, aux = sequence_logps(model, params, both, "x")
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


def make_dpo_step(model: Transformer, tx, schedule, beta: float, label_smoothing: float):
    def loss_fn(params, ref_params, micro, num_micro):
        pc, pr, aux = pair_logps(model, params, micro)
        rc, rr, _ = pair_logps(model, ref_params, micro)
        terms = dpo_terms(pc, pr, jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr), beta, label_smoothing)
        # Same convention as pretraining: model aux entries ending in "_loss" join the objective.
        aux_loss = sum((jnp.mean(v) for k, v in aux.items() if k.endswith("_loss")), jnp.float32(0))
        objective = (jnp.mean(terms["loss"]) + aux_loss) / num_micro
        return objective, {k: jnp.mean(v) for k, v in terms.items()}

    def dpo_step(state, ref_params, batch):
        """One optimizer step over `grad_accum` micro-batches of pairs ([accum, pairs, T])."""
        num_micro = batch["chosen_inputs"].shape[0]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(grads, micro):
            (_, stats), g = grad_fn(state["params"], ref_params, micro, num_micro)
            return jax.tree.map(jnp.add, grads, g), stats

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        grads, stats = jax.lax.scan(micro_step, zeros, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {k: jnp.mean(v) for k, v in stats.items()}
        metrics.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics

    return dpo_step


def make_eval_step(model: Transformer, beta: float, label_smoothing: float):
    def eval_step(params, ref_params, batch):
        pc, pr, _ = pair_logps(model, params, batch)
        rc, rr, _ = pair_logps(model, ref_params, batch)
        terms = dpo_terms(pc, pr, rc, rr, beta, label_smoothing)
        valid = batch["valid"].astype(jnp.float32)  # padding pairs of the last batch count for nothing
        sums = {k: jnp.sum(terms[k] * valid) for k in ("loss", "reward_margin", "preference_accuracy")}
        return sums, jnp.sum(valid)

    return eval_step


# ----------------------------------------------------------------------------- data
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


def _check_tokenizer(reference_dir: str) -> None:
    """The reference run's workdir carries the tokenizer it trained with; it must be ours."""
    for candidate in (os.path.dirname(reference_dir.rstrip("/")), reference_dir):
        tok = os.path.join(candidate, "tokenizer.model")
        if os.path.exists(tok):
            if not filecmp.cmp(tok, tokenizer_path(), shallow=False):
                raise ValueError(f"the reference run used {tok}, which differs from the tokenizer configured "
                                 f"here ({tokenizer_path()}); bind tokenizer_path.path = '{tok}'")
            return


# ----------------------------------------------------------------------------- the run
@gin.configurable
def dpo(workdir: str, reference_checkpoint: str = gin.REQUIRED, reference_step: int | None = None,
        train_pattern=None, eval_pattern=None, beta: float = 0.1, label_smoothing: float = 0.0,
        seq_len: int = 512, global_batch: int = 8, grad_accum: int = 1, total_steps: int = 100,
        log_every: int = 10, eval_every: int = 50, seed: int = 0, zero1: bool = False,
        checkpointing: ckpt.CheckpointConfig = None, model_overrides: dict | None = None):
    """Train a policy with DPO against the frozen `reference_checkpoint` (a checkpoints/ dir).

    global_batch counts preference pairs per step (each pair is two sequences). Evaluation
    scores every pair of eval_pattern (default: the training pairs) with the current policy.
    """
    checkpointing = checkpointing or ckpt.CheckpointConfig()
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    n_proc = jax.process_count()
    if global_batch % (n_proc * grad_accum):
        raise ValueError(f"dpo.global_batch={global_batch} must be divisible by process_count ({n_proc}) "
                         f"x grad_accum ({grad_accum})")

    reference_checkpoint = os.path.abspath(reference_checkpoint)
    _check_tokenizer(reference_checkpoint)
    vocab = get_vocabulary()
    if jax.process_index() == 0:
        train_lib._copy_atomic(tokenizer_path(), os.path.join(workdir, "tokenizer.model"))
    ref_step, cfg_fields = ckpt.read_model_config(reference_checkpoint, reference_step)
    model_config = dataclasses.replace(ModelConfig(**cfg_fields), **(model_overrides or {}))

    data = _load(train_pattern or BUILTIN_PREFERENCES, seq_len, vocab, "train")
    eval_data = _load(eval_pattern, seq_len, vocab, "eval") if eval_pattern else data

    model = Transformer(model_config)
    tx, schedule = optim.make_optimizer(total_steps)
    abstract, shardings, _ = train_lib.abstract_state(model, model_config, tx, mesh, seq_len, zero1, seed)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), checkpointing)
    model_json = dataclasses.asdict(model_config)

    with jax.set_mesh(mesh):
        ref_params = train_lib._restore_params_only(reference_checkpoint, ref_step, abstract, shardings)
        latest = manager.latest_step()
        if latest is not None:
            state = ckpt.restore(manager, latest, abstract)
            log.info("resumed from %s at step %d", manager.directory, latest)
        else:
            def start(params):  # the policy is a fresh copy of the reference, with new optimizer state
                return {"step": jnp.zeros((), jnp.int32), "params": jax.tree.map(jnp.copy, params),
                        "opt_state": tx.init(params), "rng": jax.random.PRNGKey(seed)}

            state = jax.jit(start, out_shardings=shardings)(ref_params)
        start_step = int(state["step"])
        train_lib._truncate_metrics(workdir, start_step)

        micro_shape = (grad_accum, global_batch // grad_accum, seq_len)
        batch_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec(mesh, micro_shape))
        step_fn = jax.jit(make_dpo_step(model, tx, schedule, beta, label_smoothing),
                          in_shardings=(shardings, shardings["params"], batch_sharding),
                          out_shardings=(shardings, None), donate_argnums=(0,))
        eval_spec = shd.batch_spec(mesh, micro_shape)
        eval_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*eval_spec[1:]))
        eval_fn = jax.jit(make_eval_step(model, beta, label_smoothing))  # inputs arrive sharded

        lo = jax.process_index() * global_batch // n_proc
        hi = lo + global_batch // n_proc

        def global_batch_at(step):
            local = data.take(step_indices(step, global_batch, len(data), seed)[lo:hi])
            local = {k: v.reshape((grad_accum, -1) + v.shape[1:]) for k, v in local.items()}
            return {k: jax.make_array_from_process_local_data(batch_sharding, v, micro_shape)
                    for k, v in local.items()}

        def run_eval(params):
            return evaluate(eval_fn, params, ref_params, eval_data, global_batch, lo, hi, eval_sharding)

        writer = MetricsWriter(workdir, total_steps, gin.config_str(), initial_step=start_step)
        rules_ctx = nn.logical_axis_rules(flax_rules(mesh))
        rules_ctx.__enter__()
        if start_step == 0 and eval_every:
            writer.write(0, run_eval(state["params"]))  # where the policy starts (the reference)
        t_last, steps_since = time.perf_counter(), 0
        for step in range(start_step, total_steps):
            state, metrics = step_fn(state, ref_params, global_batch_at(step))
            steps_since += 1
            done = step + 1
            if done == start_step + 1:
                write_operative_config(workdir)
            if done % log_every == 0 or done == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics["pairs_per_sec"] = steps_since * global_batch / (time.perf_counter() - t_last)
                if eval_every and (done % eval_every == 0 or done == total_steps):
                    metrics.update(run_eval(state["params"]))
                writer.write(done, metrics)
                writer.progress(done, {"loss": metrics["loss"], "acc": metrics["preference_accuracy"]})
                t_last, steps_since = time.perf_counter(), 0
            ckpt.save(manager, done, state, None, model_json, force=done == total_steps)
        rules_ctx.__exit__(None, None, None)
        manager.wait_until_finished()
        writer.close()
        write_operative_config(workdir)
        plot_loss(workdir)
    manager.close()
    return state


def evaluate(eval_fn, params, ref_params, data: PreferenceData, global_batch: int, lo: int, hi: int,
             sharding) -> dict[str, float]:
    """eval_loss, eval_reward_margin, eval_preference_accuracy over every pair of `data`."""
    totals: dict[str, float] = {}
    count = 0.0
    for start in range(0, len(data), global_batch):
        index = np.arange(start, start + global_batch)
        valid = index < len(data)
        batch = data.take(np.where(valid, index, 0)[lo:hi])
        batch["valid"] = valid[lo:hi].astype(np.int32)
        pair_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
        arrays = {k: jax.make_array_from_process_local_data(pair_sharding if v.ndim == 1 else sharding, v)
                  for k, v in batch.items()}
        sums, n = eval_fn(params, ref_params, arrays)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count += float(n)
    return {f"eval_{k}": v / max(count, 1.0) for k, v in totals.items()}


def _load(patterns, seq_len: int, vocab, split: str) -> PreferenceData:
    data = load_pairs(patterns, seq_len, vocab, progress=jax.process_index() == 0)
    message = f"DPO {split} pairs (seq_len {seq_len}): {data.report.summary()}"
    if not len(data):
        raise ValueError(message)
    if jax.process_index() == 0:
        (log.warning if data.report.skipped else log.info)(message)
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    parser.add_argument("--workdir", default=None, help="output directory (default: runs/<first gin file>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. gin_configs/runs/dpo_tiny_ja.gin)")
    load_gin(args.gin_file, args.gin_bindings)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.gin_file[0]))[0])
    dpo(workdir)


if __name__ == "__main__":
    sys.exit(main())
