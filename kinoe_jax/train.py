"""Train a kinoe_jax model: pretraining, SFT and DPO, with full parameters or LoRA.

    python -m kinoe_jax.train --gin_file=gin_configs/runs/tiny_ja.gin [--gin_bindings='train.total_steps = 10'] [--workdir=DIR]

Read top to bottom: config -> mesh -> data -> model and optimizer -> init or resume -> the loop
(step, log, evaluate, checkpoint) -> plot and sample. Running the same command with the same
workdir resumes exactly where the last checkpoint left off.

What is optimised is the objective's business (`train.objective`, kinoe_jax/objectives/):
the causal LM by default, or DPO. Everything else here holds for all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

from kinoe_jax import cli

INPUTS = {"--gin_file": cli.gin_file}
if __name__ == "__main__":  # a bad --gin_file is named before TensorFlow and JAX load
    cli.precheck(INPUTS)

import kinoe_jax.data  # noqa: F401,E402  (hides accelerators from TensorFlow before anything else)

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kinoe_jax import checkpoint as ckpt
from kinoe_jax import console, optim
from kinoe_jax.config_io import ConfigError, load_gin, write_operative_config
from kinoe_jax.data import pipeline, tasks
from kinoe_jax.data.vocab import get_vocabulary, tokenizer_path
from kinoe_jax.eval.downstream import downstream_eval
from kinoe_jax.metrics import MetricsWriter, flatten as flatten_metrics, peak_flops_per_device, plot_loss, read_metrics
from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.objectives import CausalLM, RunInfo
from kinoe_jax.objectives import trainable as trainable_lib
from kinoe_jax.objectives.base import Models
from kinoe_jax.parallel import multihost, sharding as shd
from kinoe_jax.parallel.mesh import make_mesh
from kinoe_jax.parallel.rules import flax_rules
from kinoe_jax.resilience import Faults, RunGuard, skip_bad_update, validation
from kinoe_jax.schedule_check import describe_schedule, warn_if_changed

log = logging.getLogger("kinoe_jax.train")


# ----------------------------------------------------------------------------- the step
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


# ----------------------------------------------------------------------------- state
def abstract_state(model: Transformer, model_cfg: ModelConfig, tx, mesh, seq_len: int, zero1: bool, seed: int,
                   trainable=None):
    """Shapes and shardings of the whole train state, without allocating it. The optimizer
    state covers only the trainable parameters."""
    trainable = trainable or trainable_lib.for_model(model_cfg)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), tokens)["params"])
    params = nn.meta.unbox(boxed)
    p_specs = shd.param_specs(boxed, mesh)
    t_params, _ = trainable_lib.split(params, trainable)
    t_specs, _ = trainable_lib.split(p_specs, trainable)
    opt_state = jax.eval_shape(tx.init, t_params)
    o_specs = shd.opt_state_specs(opt_state, t_params, t_specs, mesh, zero1)
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state,
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    specs = {"step": jax.sharding.PartitionSpec(), "params": p_specs, "opt_state": o_specs,
             "rng": jax.sharding.PartitionSpec()}
    shardings = shd.to_named(mesh, specs)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings, specs


def init_state(model: Transformer, tx, shardings, seq_len: int, seed: int, trainable=None):
    trainable = trainable or trainable_lib.for_model(model.cfg)

    def init():
        rng = jax.random.PRNGKey(seed)
        params = nn.meta.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"])
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(trainable_lib.split(params, trainable)[0]), "rng": jax.random.fold_in(rng, 1)}

    return jax.jit(init, out_shardings=shardings)()


@gin.configurable
def load_params_from(checkpoint_dir: str | None = None, step: int | None = None):
    """Start training from another run's parameters (continued pretraining, SFT after pretraining,
    DPO after SFT), or from an HF import (tools/convert_from_hf.py)."""
    return checkpoint_dir, step


def restore_base_params(checkpoint_dir: str, step: int | None, abstract_params, mesh):
    """Another run's base weights, laid out like `abstract_params` (adapters left out).

    A LoRA checkpoint's adapters are merged into its base first: LoRA DPO after LoRA SFT starts
    from (and is referenced against) the SFT model, with fresh adapters of its own."""
    import orbax.checkpoint as ocp

    from kinoe_jax.models import lora as lora_lib

    step, fields = ckpt.read_model_config(checkpoint_dir, step)
    source_cfg = ModelConfig(**fields)
    base_abstract = lora_lib.base_only(abstract_params)
    if source_cfg.lora is None:
        target = base_abstract
    else:  # the source's own tree (its adapters, its rank), on the same mesh
        src_abstract = abstract_state(Transformer(source_cfg), source_cfg, optax.identity(), mesh, 2, False, 0)[0]
        target = src_abstract["params"]
    manager = ckpt.make_manager(checkpoint_dir, ckpt.CheckpointConfig(async_save=False))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target},
        restore_args=jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), {"params": target}),
        partial_restore=True)))["state"]["params"]
    manager.close()
    if source_cfg.lora is not None:
        shardings = jax.tree.map(lambda s: s.sharding, base_abstract)
        restored = jax.jit(lambda p: lora_lib.merge(source_cfg, p), out_shardings=shardings)(restored)
    log.info("initialised parameters from %s step %d%s", checkpoint_dir, step,
             " (its LoRA adapters merged into the base)" if source_cfg.lora is not None else "")
    return restored


def resolve_model_config(model_config, lora, overrides, init_dir, init_step) -> ModelConfig:
    """train.model_config, or the shape of the checkpoint the run starts from; then train.lora
    and train.model_overrides (remat, dtype, ...) on top."""
    if model_config is None:
        if init_dir is None:
            raise ConfigError("bind train.model_config = @ModelConfig() (a preset in gin_configs/models/), or "
                              "load_params_from.checkpoint_dir to take the shape of that checkpoint")
        fields = ckpt.read_model_config(init_dir, init_step)[1]
        fields.pop("lora", None)  # a source's adapters are merged in; this run's come from train.lora
        model_config = ModelConfig(**fields)
    changes = dict(overrides or {})
    if lora is not None:
        changes["lora"] = lora
    return dataclasses.replace(model_config, **changes) if changes else model_config


# ----------------------------------------------------------------------------- the run
@gin.configurable
def train(workdir: str, model_config: ModelConfig | None = None, data: pipeline.DataConfig = None,
          checkpointing: ckpt.CheckpointConfig = None, objective=None, lora=None, model_overrides: dict | None = None,
          total_steps: int = 300, log_every: int = 10, eval_every: int = 100, downstream_eval_every: int = 0,
          seed: int = 0, zero1: bool = False, register_tasks=tasks.register_builtin, sample_prompt: str = "日本の四季について", sample_tokens: int = 40):
    objective = objective or CausalLM()
    data = data or pipeline.DataConfig()
    checkpointing = checkpointing or ckpt.CheckpointConfig()
    init_dir, init_step = load_params_from()
    init_dir = os.path.abspath(init_dir) if init_dir else None
    model_config = resolve_model_config(model_config, lora, model_overrides, init_dir, init_step)
    validation.validate_run(model_config, data, checkpointing, total_steps=total_steps, log_every=log_every,
                            eval_every=eval_every, downstream_eval_every=downstream_eval_every,
                            config_str=gin.config_str())
    os.makedirs(workdir, exist_ok=True)

    mesh = make_mesh()
    log.info("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    register_tasks()
    vocab = get_vocabulary()
    if init_dir:
        ckpt.check_tokenizer(init_dir)
    if jax.process_index() == 0:  # the workdir carries its tokenizer (generate and HF export read it)
        _copy_atomic(tokenizer_path(), os.path.join(workdir, "tokenizer.model"))
    if vocab.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {vocab.vocab_size} pieces but ModelConfig.vocab_size is "
                         f"{model_config.vocab_size}")
    run = RunInfo(workdir=workdir, model_config=model_config, data=data, total_steps=total_steps,
                  eval_every=eval_every, seed=seed, mesh=mesh, vocab=vocab, init_checkpoint=init_dir,
                  init_step=init_step)
    train_data = objective.setup(run)  # the objective's batches (and its checkpointable iterator)

    model = Transformer(model_config)
    models = make_models(model)
    tx, schedule = optim.make_optimizer(total_steps)
    trainable = objective.trainable(run)
    abstract, shardings, specs = abstract_state(model, model_config, tx, mesh, data.seq_len, zero1, seed, trainable)

    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), checkpointing)
    guard = RunGuard(workdir, manager)  # preemption, bad steps, stalls, disk space, alerts
    model_json = dataclasses.asdict(model_config)
    schedule_now = describe_schedule(schedule, total_steps, train_data.iterator)
    with jax.set_mesh(mesh), guard:  # a run that halts itself raises TrainingHalted here
        def restore_params(directory, step):
            return restore_base_params(directory, step, abstract["params"], mesh)

        latest = manager.latest_step()
        if latest is not None:  # the newest checkpoint that reads back whole
            state, latest = ckpt.restore_newest_good(manager, abstract, train_data.iterator, notify=guard.notify)
            console.say("resumed from %s at step %d", manager.directory, latest)
            warn_if_changed(ckpt.read_run_info(manager, latest), schedule_now, latest)
        else:
            state = init_state(model, tx, shardings, data.seq_len, seed, trainable)
            if init_dir:  # the base comes from there; LoRA adapters start fresh (B = 0)
                state["params"] = trainable_lib.merge(restore_params(init_dir, init_step), state["params"])
        extra, extra_shardings = objective.frozen_inputs(run, abstract["params"], shardings["params"], restore_params)
        start = int(state["step"])
        _truncate_metrics(workdir, start)

        local = pipeline.local_batch_size(data)
        micro_shape = (data.grad_accum, data.global_batch // data.grad_accum, data.seq_len)
        batch_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec(mesh, micro_shape))
        train_step = jax.jit(make_train_step(model, tx, schedule, objective, trainable),
                             in_shardings=(shardings, batch_sharding, None, extra_shardings),
                             out_shardings=(shardings, None), donate_argnums=(0,))

        tokens_per_step = objective.tokens_per_step(run)
        flops_per_step = objective.flops_per_step(run)
        peak = peak_flops_per_device() * jax.device_count()
        writer = MetricsWriter(workdir, total_steps, gin.config_str(), initial_step=start)
        log.info("%.3g FLOPs/step, peak %.3g FLOP/s", flops_per_step, peak)
        if jax.process_index() == 0:
            console.say(_describe(objective, model_config, data, total_steps, mesh, workdir, start,
                                  _count(trainable_lib.split(abstract["params"], trainable)[0])))
        guard.start(start, writer.wandb_run)

        def to_global(batch):
            micro = {k: np.asarray(v).reshape((data.grad_accum, local // data.grad_accum) + np.shape(v)[1:])
                     for k, v in batch.items()}
            return {k: jax.make_array_from_process_local_data(batch_sharding, v, micro_shape + v.shape[3:])
                    for k, v in micro.items()}

        # Activation constraints in the model read the same rules table through flax's context
        # (only while tracing the steps: at init, parameters get their layout from out_shardings).
        rules_ctx = nn.logical_axis_rules(flax_rules(mesh))
        rules_ctx.__enter__()
        if start == 0 and eval_every and objective.eval_at_start:
            writer.write(0, objective.evaluate(run, models, state["params"], extra))  # where it starts
        t_last, steps_since = time.perf_counter(), 0
        for step in range(start, total_steps):
            guard.before_step(step + 1, train_data)  # fault-injection hooks, off by default
            local_batch = train_data.next(step)
            if step == start:  # bad data surfaces now, before the expensive first compile
                objective.check_first_batch(local_batch, run)
            state, metrics = train_step(state, to_global(local_batch), guard.loss_ceiling(), extra)
            steps_since += 1
            done = step + 1
            guard.after_step(done, metrics)  # counts skipped steps and spikes; watchdog heartbeat
            if done == start + 1:
                write_operative_config(workdir)
            evaluate = _due(done, eval_every, total_steps)
            downstream = _due(done, downstream_eval_every, total_steps)
            if done % log_every == 0 or done == total_steps or done == 1 or evaluate or downstream:
                metrics = flatten_metrics(jax.device_get(metrics))
                elapsed = time.perf_counter() - t_last
                tps = steps_since * tokens_per_step / elapsed
                metrics.update(tokens_per_sec=tps, mfu=steps_since * flops_per_step / elapsed / peak)
                metrics.update(objective.rate_metrics(tps, run))
                metrics.update(guard.counters())
                if evaluate:
                    metrics.update(objective.evaluate(run, models, state["params"], extra))
                if downstream:  # llm-jp-eval style scores of the live, sharded parameters
                    metrics.update(downstream_eval(model_config, state["params"], mesh, vocab=vocab))
                writer.write(done, metrics)
                if (evaluate or downstream) and jax.process_index() == 0:
                    console.say(_evaluation_line(done, metrics))
                writer.progress(done, {label: metrics[key] for label, key in objective.progress_keys.items()})
                t_last, steps_since = time.perf_counter(), 0
            stop = guard.should_stop(done)  # preempted (every process agrees) or too many bad steps
            if guard.may_save(done, state, force=stop or done == total_steps):  # due, and fits on disk
                ckpt.save(manager, done, state, train_data.iterator, model_json, force=True,
                          run_info=schedule_now.at(done))
                if jax.process_index() == 0:
                    console.say("step %d: checkpoint saved to %s", done, os.path.join(manager.directory, str(done)))
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


def _describe(objective, cfg: ModelConfig, data, total_steps: int, mesh, workdir: str, start: int,
              trained: int) -> str:
    """The one line that says what this run is."""
    what = f"{objective.name} of a {cfg.num_params() / 1e6:.1f}M-parameter model ({cfg.num_layers} layers"
    what += f", hidden {cfg.hidden_size}" + (f", {cfg.num_experts} experts" if cfg.num_experts else "") + ")"
    if cfg.lora is not None:
        what += f" with LoRA rank {cfg.lora.rank} ({trained / 1e6:.2f}M parameters trained)"
    where = f"{mesh.size} {mesh.devices.flat[0].platform} device{'s' if mesh.size > 1 else ''}"
    steps = f"steps {start + 1}-{total_steps} (resumed)" if start else f"{total_steps} step{'s' if total_steps > 1 else ''}"
    return (f"training {what}: {steps} of {data.global_batch} x {data.seq_len} tokens on {where} -> {workdir}")


def _evaluation_line(step: int, metrics: dict) -> str:
    shown = {k: v for k, v in metrics.items() if k.startswith("eval_") or k == "downstream/average"}
    return f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())


def _due(done: int, every: int, total_steps: int) -> bool:
    return bool(every) and (done % every == 0 or done == total_steps)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


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
    parser.add_argument("--verbose", action="store_true",
                        help="show every log line on the terminal (they always go to DIR/logs/)")
    multihost.add_flags(parser)
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. gin_configs/runs/tiny_ja.gin)")
    cli.check_args(parser, args, INPUTS)
    with cli.reported(parser, ConfigError):
        load_gin(args.gin_file, args.gin_bindings)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.gin_file[0]))[0])
    multihost.initialize(workdir, **multihost.flag_values(args))  # before anything touches devices
    with multihost.report_errors():
        train(workdir)
    multihost.finish()


if __name__ == "__main__":
    sys.exit(main())
