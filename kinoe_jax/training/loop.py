"""The training loop: pretraining, SFT and DPO, with full parameters or LoRA.

Read `train` top to bottom: the run -> its parts (model, optimizer, state layout, checkpoints,
guard) -> init or resume -> the steps (step, log, evaluate, save) -> plot and sample. Running
the same command with the same workdir resumes exactly where the last checkpoint left off.

What is optimised is the objective's business (`train.objective`, kinoe_jax/training/objectives/):
the causal LM by default, or DPO. Everything else here holds for all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

import flax.linen as nn
import gin
import jax
import numpy as np

from kinoe_jax.config.gin_io import write_operative_config
from kinoe_jax.data import pipeline, pretraining
from kinoe_jax.data.vocab import get_vocabulary, tokenizer_path
from kinoe_jax.eval.downstream import downstream_eval
from kinoe_jax.inference.texts import generate_text
from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.parallel import multihost
from kinoe_jax.parallel.mesh import make_mesh
from kinoe_jax.parallel.rules import flax_rules
from kinoe_jax.training import checkpoint as ckpt
from kinoe_jax.training import lost_peer, optim
from kinoe_jax.training.metrics_writer import MetricsWriter, peak_flops_per_device, plot_loss, read_metrics
from kinoe_jax.training.metrics_writer import flatten as flatten_metrics
from kinoe_jax.training.objectives import CausalLM, RunInfo
from kinoe_jax.training.objectives import trainable as trainable_lib
from kinoe_jax.training.resilience import RunGuard
from kinoe_jax.training.resilience.run_checks import validate_run
from kinoe_jax.training.schedule_check import describe_schedule, warn_if_changed
from kinoe_jax.training.state import abstract_state, init_state, load_params_from, resolve_model_config, \
    restore_base_params
from kinoe_jax.training.step import make_models, make_train_step
from kinoe_jax.utils import atomic, console

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How long the run is and how often it logs and evaluates (train.* in gin)."""

    total_steps: int
    log_every: int
    eval_every: int
    downstream_eval_every: int

    def due(self, done: int, every: int) -> bool:
        return bool(every) and (done % every == 0 or done == self.total_steps)

    def logs(self, done: int) -> bool:
        return (done % self.log_every == 0 or done in (1, self.total_steps) or self.due(done, self.eval_every)
                or self.due(done, self.downstream_eval_every))


@dataclasses.dataclass
class Parts:
    """What the loop runs with, built once from the run."""

    model: Transformer
    tx: object
    schedule: object
    trainable: object
    abstract: dict
    shardings: dict
    manager: object
    guard: RunGuard


@gin.configurable
def train(workdir: str, model_config: ModelConfig | None = None, data: pipeline.DataConfig = None,
          checkpointing: ckpt.CheckpointConfig = None, objective=None, lora=None, model_overrides: dict | None = None,
          total_steps: int = 300, log_every: int = 10, eval_every: int = 100, downstream_eval_every: int = 0,
          seed: int = 0, zero1: bool = False, register_tasks=pretraining.register_builtin,
          sample_prompt: str = "日本の四季について", sample_tokens: int = 40):
    objective = objective or CausalLM()
    checkpointing = checkpointing or ckpt.CheckpointConfig()
    cadence = Cadence(total_steps, log_every, eval_every, downstream_eval_every)
    run = prepare_run(workdir, model_config, lora, model_overrides, data or pipeline.DataConfig(), checkpointing,
                      cadence, seed, register_tasks)
    train_data = objective.setup(run)  # the objective's batches (and its checkpointable iterator)
    parts = build_parts(run, objective, checkpointing, zero1)
    ckpt.check_data_layout(parts.manager, train_data.iterator)  # a stream it cannot continue: one line, now
    schedule_now = describe_schedule(parts.schedule, total_steps, train_data.iterator)
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(run.mesh))
        stack.enter_context(parts.guard)  # a run that halts itself raises TrainingHalted here
        stack.enter_context(multihost.collective_failures())  # a dead peer is named before the crash alert
        lost_peer.watch(workdir, parts.manager, parts.guard)
        state, start = init_or_resume(run, parts, train_data, schedule_now)
        extra, extra_shardings = objective.frozen_inputs(
            run, parts.abstract["params"], parts.shardings["params"],
            lambda directory, step: restore_base_params(directory, step, parts.abstract["params"], run.mesh))
        _truncate_metrics(workdir, start)
        step_fn, to_global = compile_step(run, parts, objective, extra_shardings)
        steps = StepLog(run, objective, parts, cadence, start)
        with nn.logical_axis_rules(flax_rules(run.mesh)):  # the model's activation constraints
            if start == 0 and eval_every and objective.eval_at_start:
                steps.writer.write(0, objective.evaluate(run, steps.models, state["params"], extra))
            step = start
            while step < total_steps:
                parts.guard.before_step(step + 1, train_data)  # fault-injection hooks, off by default
                batch = parts.guard.next_batch(step, train_data)  # past the batches a spike rollback skips
                if step == start:  # bad data surfaces now, before the expensive first compile
                    objective.check_first_batch(batch, run)
                state, metrics = step_fn(state, to_global(batch), parts.guard.loss_ceiling(), extra,
                                         parts.guard.lr_scale(step))
                done = step + 1
                parts.guard.after_step(done, metrics)  # counts skipped steps and spikes; watchdog heartbeat
                if done == start + 1:
                    write_operative_config(workdir)
                steps.record(done, metrics, state["params"], extra)
                if (back_to := parts.guard.rollback_target()) is not None:  # a confirmed loss spike
                    state, step = roll_back(parts, train_data, steps, back_to)
                    continue
                stop = parts.guard.should_stop(done)  # preempted (every process agrees) or too many bad steps
                save_if_due(parts, train_data, state, done, schedule_now, force=stop or done == total_steps)
                multihost.fault_point(done)
                if stop:
                    break
                step = done
        finish(run, parts, steps.writer, state, sample_prompt, sample_tokens)
    parts.manager.close()
    return state


# ----------------------------------------------------------------------------- before the steps
def prepare_run(workdir, model_config, lora, model_overrides, data, checkpointing, cadence: Cadence, seed: int,
                register_tasks) -> RunInfo:
    """Check the configuration, build the mesh, register the data and settle the tokenizer."""
    init_dir, init_step = load_params_from()
    init_dir = os.path.abspath(init_dir) if init_dir else None
    model_config = resolve_model_config(model_config, lora, model_overrides, init_dir, init_step)
    validate_run(model_config, data, checkpointing, total_steps=cadence.total_steps, log_every=cadence.log_every,
                 eval_every=cadence.eval_every, downstream_eval_every=cadence.downstream_eval_every,
                 config_str=gin.config_str())
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh()
    log.info("mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size, jax.process_count())
    register_tasks()
    vocab = get_vocabulary()
    if init_dir:
        ckpt.check_tokenizer(init_dir)
    if jax.process_index() == 0:  # the workdir carries its tokenizer (generate and HF export read it)
        atomic.copy_file(tokenizer_path(), os.path.join(workdir, "tokenizer.model"))
    if vocab.vocab_size > model_config.vocab_size:
        raise ValueError(f"tokenizer has {vocab.vocab_size} pieces but ModelConfig.vocab_size is "
                         f"{model_config.vocab_size}")
    return RunInfo(workdir=workdir, model_config=model_config, data=data, total_steps=cadence.total_steps,
                   eval_every=cadence.eval_every, seed=seed, mesh=mesh, vocab=vocab, init_checkpoint=init_dir,
                   init_step=init_step)


def build_parts(run: RunInfo, objective, checkpointing, zero1: bool) -> Parts:
    model = Transformer(run.model_config)
    tx, schedule = optim.make_optimizer(run.total_steps)
    trainable = objective.trainable(run)
    abstract, shardings, _ = abstract_state(model, run.model_config, tx, run.mesh, run.data.seq_len, zero1,
                                            run.seed, trainable)
    manager = ckpt.make_manager(os.path.join(run.workdir, "checkpoints"), checkpointing)
    guard = RunGuard(run.workdir, manager)  # preemption, bad steps, stalls, disk space, alerts
    return Parts(model, tx, schedule, trainable, abstract, shardings, manager, guard)


def init_or_resume(run: RunInfo, parts: Parts, train_data, schedule_now) -> tuple[dict, int]:
    """The newest checkpoint that reads back whole, or a fresh state (from load_params_from's base)."""
    latest = parts.manager.latest_step()
    if latest is not None:
        state, latest = ckpt.restore_newest_good(parts.manager, parts.abstract, train_data.iterator,
                                                 notify=parts.guard.notify)
        console.say("resumed from %s at step %d", parts.manager.directory, latest)
        warn_if_changed(ckpt.read_run_info(parts.manager, latest), schedule_now, latest)
    else:
        state = init_state(parts.model, parts.tx, parts.shardings, run.data.seq_len, run.seed, parts.trainable)
        if run.init_checkpoint:  # the base comes from there; LoRA adapters start fresh (B = 0)
            base = restore_base_params(run.init_checkpoint, run.init_step, parts.abstract["params"], run.mesh)
            state["params"] = trainable_lib.merge(base, state["params"])
    return state, int(state["step"])


def compile_step(run: RunInfo, parts: Parts, objective, extra_shardings):
    """The jitted step (state donated) and the function that lays this process's batch out globally."""
    data = run.data
    micro_shape = pipeline.micro_batch_shape(data)
    batch_sharding = pipeline.batch_sharding(run.mesh, data)
    step_fn = jax.jit(make_train_step(parts.model, parts.tx, parts.schedule, objective, parts.trainable),
                      in_shardings=(parts.shardings, batch_sharding, None, extra_shardings, None),
                      out_shardings=(parts.shardings, None), donate_argnums=(0,))

    def to_global(batch):
        micro = {k: np.asarray(v).reshape((data.grad_accum, -1) + np.shape(v)[1:]) for k, v in batch.items()}
        return {k: jax.make_array_from_process_local_data(batch_sharding, v, micro_shape + v.shape[3:])
                for k, v in micro.items()}

    return step_fn, to_global


# ----------------------------------------------------------------------------- during the steps
class StepLog:
    """Logging and evaluation after each step: metrics.jsonl, W&B, the progress bar, the terminal."""

    def __init__(self, run: RunInfo, objective, parts: Parts, cadence: Cadence, start: int):
        self.run, self.objective, self.cadence = run, objective, cadence
        self.models = make_models(parts.model)
        self.tokens_per_step = objective.tokens_per_step(run)
        self.flops_per_step = objective.flops_per_step(run)
        self.peak = peak_flops_per_device() * jax.device_count()
        self.writer = MetricsWriter(run.workdir, cadence.total_steps, gin.config_str(), initial_step=start)
        log.info("%.3g FLOPs/step, peak %.3g FLOP/s", self.flops_per_step, self.peak)
        if jax.process_index() == 0:
            trained = _count(trainable_lib.split(parts.abstract["params"], parts.trainable)[0])
            console.say(describe_run(objective, run, cadence.total_steps, start, trained))
        parts.guard.start(start, self.writer.wandb_run)
        self.guard = parts.guard
        self.t_last, self.steps_since = time.perf_counter(), 0

    def record(self, done: int, metrics, params, extra) -> None:
        self.steps_since += 1
        if not self.cadence.logs(done):
            return
        run, cadence = self.run, self.cadence
        metrics = flatten_metrics(jax.device_get(metrics))
        elapsed = time.perf_counter() - self.t_last
        tps = self.steps_since * self.tokens_per_step / elapsed
        metrics.update(tokens_per_sec=tps, mfu=self.steps_since * self.flops_per_step / elapsed / self.peak)
        metrics.update(self.objective.rate_metrics(tps, run))
        metrics.update(self.guard.counters())
        evaluate, downstream = cadence.due(done, cadence.eval_every), cadence.due(done, cadence.downstream_eval_every)
        if evaluate:
            metrics.update(self.objective.evaluate(run, self.models, params, extra))
        if downstream:  # llm-jp-eval style scores of the live, sharded parameters
            metrics.update(downstream_eval(run.model_config, params, run.mesh, vocab=run.vocab))
        self.writer.write(done, metrics)
        if (evaluate or downstream) and jax.process_index() == 0:
            console.say(_evaluation_line(done, metrics))
        self.writer.progress(done, {label: metrics[key] for label, key in self.objective.progress_keys.items()})
        self.t_last, self.steps_since = time.perf_counter(), 0

    def restart(self) -> None:
        """After a rollback: the rate counters start over (the restore is not a step)."""
        self.t_last, self.steps_since = time.perf_counter(), 0


def roll_back(parts: Parts, train_data, steps: StepLog, to_step: int) -> tuple[dict, int]:
    """Restore checkpoint `to_step` (state and data iterator) after a confirmed loss spike; the
    guard has already planned the skipped batches and removed the checkpoints after it."""
    if jax.process_index() == 0:
        console.say("step %d: loss spike confirmed; rolling back to checkpoint %d (see %s)", parts.guard.last_step,
                    to_step, os.path.join(parts.manager.directory.parent, "spike_rollbacks.json"))
    state = ckpt.restore(parts.manager, to_step, parts.abstract, train_data.iterator)
    parts.guard.rolled_back(to_step)
    steps.restart()
    return state, to_step


def save_if_due(parts: Parts, train_data, state, done: int, schedule_now, force: bool) -> None:
    if parts.guard.may_save(done, state, force=force):  # due, and fits on disk
        model_json = dataclasses.asdict(parts.model.cfg)
        ckpt.save(parts.manager, done, state, train_data.iterator, model_json, force=True,
                  run_info=schedule_now.at(done))
        if jax.process_index() == 0:
            console.say("step %d: checkpoint saved to %s", done, os.path.join(parts.manager.directory, str(done)))


# ----------------------------------------------------------------------------- after the steps
def finish(run: RunInfo, parts: Parts, writer: MetricsWriter, state, sample_prompt: str, sample_tokens: int) -> None:
    parts.manager.wait_until_finished()
    parts.guard.finish()  # the closing alert: finished, preempted or halted
    writer.close()
    write_operative_config(run.workdir)
    if jax.process_index() == 0:
        plot_loss(run.workdir)
    if sample_prompt and not parts.guard.stopped:  # every process joins: the parameters span them all
        text = generate_text(run.model_config, state["params"], sample_prompt, max_new_tokens=sample_tokens)
        if jax.process_index() == 0:
            print(f"\nsample (greedy) 「{sample_prompt}」→ {text}", flush=True)


def describe_run(objective, run: RunInfo, total_steps: int, start: int, trained: int) -> str:
    """The one line that says what this run is."""
    cfg, data, mesh = run.model_config, run.data, run.mesh
    what = f"{objective.name} of a {cfg.num_params() / 1e6:.1f}M-parameter model ({cfg.num_layers} layers"
    what += f", hidden {cfg.hidden_size}" + (f", {cfg.num_experts} experts" if cfg.num_experts else "") + ")"
    if cfg.lora is not None:
        what += f" with LoRA rank {cfg.lora.rank} ({trained / 1e6:.2f}M parameters trained)"
    where = f"{mesh.size} {mesh.devices.flat[0].platform} device{'s' if mesh.size > 1 else ''}"
    steps = f"steps {start + 1}-{total_steps} (resumed)" if start else f"{total_steps} step{'s' if total_steps > 1 else ''}"
    return f"training {what}: {steps} of {data.global_batch} x {data.seq_len} tokens on {where} -> {run.workdir}"


def _evaluation_line(step: int, metrics: dict) -> str:
    shown = {k: v for k, v in metrics.items() if k.startswith("eval_") or k == "downstream/average"}
    return f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _truncate_metrics(workdir: str, step: int) -> None:
    """On resume, forget metrics logged after the checkpoint we restart from."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() or not os.path.exists(path):
        return
    rows = [r for r in read_metrics(workdir) if r["step"] <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
