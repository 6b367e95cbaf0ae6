"""Train a kinoe_jax model.

    python -m kinoe_jax.train --gin_file=gin_configs/runs/tiny_ja.gin [--gin_bindings='train.total_steps = 10'] [--workdir=DIR]

Read top to bottom: config -> mesh -> data -> model and optimizer -> init or resume -> the loop
(step, log, evaluate, checkpoint) -> plot and sample. Running the same command with the same
workdir resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from kinoe_jax.config_io import load_gin, write_operative_config
from kinoe_jax.data import phases, pipeline, tasks
from kinoe_jax.data.vocab import get_vocabulary, tokenizer_path
from kinoe_jax.metrics import MetricsWriter, flatten as flatten_metrics, peak_flops_per_device, plot_loss, read_metrics
from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.parallel import multihost, sharding as shd
from kinoe_jax.parallel.mesh import make_mesh
from kinoe_jax.parallel.rules import flax_rules
from kinoe_jax.resilience import Faults, RunGuard, skip_bad_update, validation

log = logging.getLogger("kinoe_jax.train")


# ----------------------------------------------------------------------------- the step
def make_loss_fn(model: Transformer):
    def loss_fn(params, micro, num_tokens, num_micro):
        logits, aux = model.apply({"params": params}, micro["decoder_input_tokens"],
                                  micro["decoder_positions"], micro["decoder_segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, micro["decoder_target_tokens"])
        weights = micro["decoder_loss_weights"].astype(jnp.float32)
        ce_sum = jnp.sum(ce * weights)
        # Model-reported auxiliary losses (e.g. MoE load balancing) end in "_loss" and are
        # already scaled by their coefficients; other aux entries are only metrics.
        aux_loss = sum((jnp.mean(v) for k, v in aux.items() if k.endswith("_loss")), jnp.float32(0))
        objective = ce_sum / num_tokens + aux_loss / num_micro
        return objective, (ce_sum, aux)

    return loss_fn


def make_train_step(model: Transformer, tx, schedule):
    loss_fn = make_loss_fn(model)
    faults = Faults()  # fault injection for tests; off unless bound in gin

    def train_step(state, batch, loss_ceiling=np.inf):
        """One optimizer step over `grad_accum` micro-batches (batch: [accum, micro, T]).

        A step with non-finite loss/gradients (or a loss above `loss_ceiling`) is not applied."""
        num_micro = batch["decoder_input_tokens"].shape[0]
        num_tokens = jnp.maximum(jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32)), 1.0)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(carry, micro):
            grads, ce_sum = carry
            (_, (ce, aux)), g = grad_fn(state["params"], micro, num_tokens, num_micro)
            return (jax.tree.map(jnp.add, grads, g), ce_sum + ce), aux

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        (grads, ce_sum), aux = jax.lax.scan(micro_step, (zeros, jnp.float32(0)), batch)
        grads = faults.poison_grads(grads, state["step"])

        def update():
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            return optax.apply_updates(state["params"], updates), opt_state

        metrics = {"loss": ce_sum / num_tokens, "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state["step"]), "num_tokens": num_tokens}
        metrics.update({k: jnp.mean(v, axis=0) for k, v in aux.items()})  # per-layer stats
        return skip_bad_update(state, update, metrics, loss_ceiling)

    return train_step


def make_eval_step(model: Transformer):
    def eval_step(params, batch):
        logits, _ = model.apply({"params": params}, batch["decoder_input_tokens"],
                                batch["decoder_positions"], batch["decoder_segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
        w = batch["decoder_loss_weights"].astype(jnp.float32)
        return jnp.sum(ce * w), jnp.sum(w)

    return eval_step


# ----------------------------------------------------------------------------- state
def abstract_state(model: Transformer, model_cfg: ModelConfig, tx, mesh, seq_len: int, zero1: bool, seed: int):
    """Shapes and shardings of the whole train state, without allocating it."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), tokens)["params"])
    params = nn.meta.unbox(boxed)
    p_specs = shd.param_specs(boxed, mesh)
    opt_state = jax.eval_shape(tx.init, params)
    o_specs = shd.opt_state_specs(opt_state, params, p_specs, mesh, zero1)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state,
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    specs = {"step": jax.sharding.PartitionSpec(), "params": p_specs, "opt_state": o_specs,
             "rng": jax.sharding.PartitionSpec()}
    shardings = shd.to_named(mesh, specs)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings, specs


def init_state(model: Transformer, tx, shardings, seq_len: int, seed: int):
    def init():
        rng = jax.random.PRNGKey(seed)
        params = nn.meta.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "rng": jax.random.fold_in(rng, 1)}

    return jax.jit(init, out_shardings=shardings)()


@gin.configurable
def load_params_from(checkpoint_dir: str | None = None, step: int | None = None):
    """Start training from another run's parameters (continued pretraining, SFT after pretraining)."""
    return checkpoint_dir, step


def _restore_params_only(checkpoint_dir: str, step: int | None, abstract, shardings):
    manager = ckpt.make_manager(checkpoint_dir, ckpt.CheckpointConfig(async_save=False))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"load_params_from: no checkpoint in {checkpoint_dir}")
    import orbax.checkpoint as ocp

    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": abstract["params"]},
            restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), {"params": abstract["params"]}),
            partial_restore=True)))
    log.info("initialised parameters from %s step %d", checkpoint_dir, step)
    return restored["state"]["params"]


# ----------------------------------------------------------------------------- the run
@gin.configurable
def train(workdir: str, model_config: ModelConfig = gin.REQUIRED, data: pipeline.DataConfig = None,
          checkpointing: ckpt.CheckpointConfig = None, total_steps: int = 300, log_every: int = 10,
          eval_every: int = 100, seed: int = 0, zero1: bool = False, register_tasks=tasks.register_builtin,
          sample_prompt: str = "日本の四季について", sample_tokens: int = 40):
    data = data or pipeline.DataConfig()
    checkpointing = checkpointing or ckpt.CheckpointConfig()
    validation.validate_run(model_config, data, checkpointing, total_steps=total_steps, log_every=log_every,
                            eval_every=eval_every, config_str=gin.config_str())
    os.makedirs(workdir, exist_ok=True)

    mesh = make_mesh()
    log.info("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    register_tasks()
    vocab = get_vocabulary()
    if jax.process_index() == 0:  # the workdir carries its tokenizer (generate and HF export read it)
        _copy_atomic(tokenizer_path(), os.path.join(workdir, "tokenizer.model"))
    if vocab.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {vocab.vocab_size} pieces but ModelConfig.vocab_size is "
                         f"{model_config.vocab_size}")
    data_iter = phases.train_iterator(data, total_steps)  # one mixture, or a phase schedule
    eval_data = pipeline.eval_batches(data) if eval_every else []

    model = Transformer(model_config)
    tx, schedule = optim.make_optimizer(total_steps)
    abstract, shardings, specs = abstract_state(model, model_config, tx, mesh, data.seq_len, zero1, seed)

    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), checkpointing)
    guard = RunGuard(workdir, manager)  # preemption, bad steps, stalls, disk space, alerts
    model_json = dataclasses.asdict(model_config)
    with jax.set_mesh(mesh), guard:  # a run that halts itself raises TrainingHalted here
        latest = manager.latest_step()
        if latest is not None:  # the newest checkpoint that reads back whole
            state, latest = ckpt.restore_newest_good(manager, abstract, data_iter, notify=guard.notify)
            log.info("resumed from %s at step %d", manager.directory, latest)
        else:
            state = init_state(model, tx, shardings, data.seq_len, seed)
            src_dir, src_step = load_params_from()
            if src_dir:
                state["params"] = _restore_params_only(src_dir, src_step, abstract, shardings)
        start = int(state["step"])
        _truncate_metrics(workdir, start)

        local = pipeline.local_batch_size(data)
        micro_shape = (data.grad_accum, data.global_batch // data.grad_accum, data.seq_len)
        batch_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec(mesh, micro_shape))
        train_step = jax.jit(make_train_step(model, tx, schedule), in_shardings=(shardings, batch_sharding, None),
                             out_shardings=(shardings, None), donate_argnums=(0,))
        eval_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*shd.batch_spec(mesh, (1,) + micro_shape[1:])[1:]))
        eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings["params"], eval_sharding))

        tokens_per_step = data.global_batch * data.seq_len
        flops_per_step = model_config.flops_per_token(data.seq_len) * tokens_per_step
        peak = peak_flops_per_device() * jax.device_count()
        writer = MetricsWriter(workdir, total_steps, gin.config_str(), initial_step=start)
        log.info("%d parameters, %.3g FLOPs/step, peak %.3g FLOP/s", model_config.num_params(), flops_per_step, peak)
        guard.start(start, writer.wandb_run)

        def to_global(batch):
            micro = pipeline.to_micro_batches(batch, data.grad_accum)
            return {k: jax.make_array_from_process_local_data(batch_sharding, v, micro_shape)
                    for k, v in micro.items()}

        # Activation constraints in the model read the same rules table through flax's context
        # (only while tracing the steps: at init, parameters get their layout from out_shardings).
        rules_ctx = nn.logical_axis_rules(flax_rules(mesh))
        rules_ctx.__enter__()
        t_last, steps_since = time.perf_counter(), 0
        for step in range(start, total_steps):
            guard.before_step(step + 1, data_iter)  # fault-injection hooks, off by default
            local_batch = phases.next_batch(data_iter, step)
            if step == start:  # bad data surfaces now, before the expensive first compile
                validation.check_batch(local_batch, vocab_size=model_config.vocab_size, batch_size=local,
                                       seq_len=data.seq_len, max_seq_len=model_config.max_seq_len)
            batch = to_global(local_batch)
            state, metrics = train_step(state, batch, guard.loss_ceiling())
            steps_since += 1
            done = step + 1
            guard.after_step(done, metrics)  # counts skipped steps and spikes; watchdog heartbeat
            if done == start + 1:
                write_operative_config(workdir)
            if done % log_every == 0 or done == total_steps or done == 1:
                metrics = flatten_metrics(jax.device_get(metrics))
                elapsed = time.perf_counter() - t_last
                tps = steps_since * tokens_per_step / elapsed
                metrics.update(tokens_per_sec=tps, mfu=steps_since * flops_per_step / elapsed / peak)
                metrics.update(guard.counters())
                if eval_data and (done % eval_every == 0 or done == total_steps):
                    metrics["eval_loss"] = evaluate(eval_step, state["params"], eval_data, mesh, eval_sharding)
                writer.write(done, metrics)
                writer.progress(done, {"loss": metrics["loss"], "tok/s": tps})
                t_last, steps_since = time.perf_counter(), 0
            stop = guard.should_stop(done)  # preempted (every process agrees) or too many bad steps
            if guard.may_save(done, state, force=stop or done == total_steps):  # due, and fits on disk
                ckpt.save(manager, done, state, data_iter, model_json, force=True)
            multihost.fault_point(done)
            if stop:
                break
        rules_ctx.__exit__(None, None, None)
        manager.wait_until_finished()
        guard.finish()  # the closing alert: finished, preempted or halted
        writer.close()
        write_operative_config(workdir)
        if jax.process_index() == 0:
            plot_loss(workdir)
        if sample_prompt and not guard.stopped:  # every process joins: the parameters span them all
            from kinoe_jax.generate import generate_text

            text = generate_text(model_config, state["params"], sample_prompt, max_new_tokens=sample_tokens)
            if jax.process_index() == 0:
                print(f"\nsample (greedy) 「{sample_prompt}」→ {text}", flush=True)
    manager.close()
    return state


def evaluate(eval_step, params, eval_data, mesh, sharding) -> float:
    total = count = 0.0
    for batch in eval_data:
        arrays = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        s, n = eval_step(params, arrays)
        total += float(s)
        count += float(n)
    return total / max(count, 1.0)


def _copy_atomic(src: str, dst: str) -> None:
    import shutil

    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _truncate_metrics(workdir: str, step: int) -> None:
    """On resume, forget metrics logged after the checkpoint we restart from."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() or not os.path.exists(path):
        return
    rows = [r for r in read_metrics(workdir) if r["step"] <= step]
    import json

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    parser.add_argument("--workdir", default=None, help="output directory (default: runs/<first gin file>)")
    multihost.add_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. gin_configs/runs/tiny_ja.gin)")
    load_gin(args.gin_file, args.gin_bindings)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.gin_file[0]))[0])
    multihost.initialize(workdir, **multihost.flag_values(args))  # before anything touches devices
    with multihost.report_errors():
        train(workdir)
    multihost.finish()


if __name__ == "__main__":
    sys.exit(main())
