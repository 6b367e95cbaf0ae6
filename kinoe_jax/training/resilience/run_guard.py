"""RunGuard: what keeps a weeks-long run alive, behind a few calls from the training loop.

    guard = RunGuard(workdir, manager)
    with guard:                                   # SIGTERM handling; halts raise on leaving
        guard.start(step, wandb_run)              # "resumed after preemption" alert, watchdog
        for ...:
            guard.before_step(done, train_data)    # fault-injection hooks (off by default)
            batch = guard.next_batch(step, train_data)   # past batches a spike rollback skips
            state, metrics = train_step(state, batch, guard.loss_ceiling(), extra, guard.lr_scale(step))
            guard.after_step(done, metrics)       # skipped steps, spikes, watchdog heartbeat
            if (to := guard.rollback_target()) is not None: restore `to`; guard.rolled_back(to)
            stop = guard.should_stop(done)        # preempted (all processes agree) or halted
            if guard.may_save(done, state, force=...): ckpt.save(...)   # disk-space check
            if stop: break
        manager.wait_until_finished(); guard.finish()

The step flags are read one step late (the host does not wait for the step it just dispatched),
except at logging steps, where the loop waits anyway.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time

import gin
import jax
import jax.numpy as jnp

from kinoe_jax.training.resilience.alerts import Alerter
from kinoe_jax.training.resilience.diskspace import DiskGuard, human
from kinoe_jax.training.resilience.faults import Faults
from kinoe_jax.training.resilience.guards import StepGuard
from kinoe_jax.training.resilience.integrity import all_processes_ok, discard_unfinished
from kinoe_jax.training.resilience.preemption import PreemptionGuard
from kinoe_jax.training.resilience.spike_guard import SpikeGuard
from kinoe_jax.training.resilience.watchdog import EXIT_HUNG, Watchdog, dump_stacks, end_child_processes

log = logging.getLogger(__name__)

PREEMPTED_MARKER = "preempted.json"


class TrainingHalted(RuntimeError):
    """The run stopped itself (too many bad steps, or its final checkpoint could not be written)."""


@gin.configurable
class RunGuard:
    def __init__(self, workdir: str, manager, watchdog_timeout_s: float = 3600.0, run_name: str | None = None):
        self.workdir = workdir
        self.manager = manager
        self.primary = jax.process_index() == 0
        self.alerts = Alerter(run_name=os.path.basename(os.path.abspath(workdir)) if run_name is None else run_name,
                              log_file=os.path.join(workdir, "alerts.jsonl"), active=self.primary)
        self.steps = StepGuard()
        self.faults = Faults()
        self.disk = DiskGuard(os.fspath(manager.directory))
        self.spikes = SpikeGuard(workdir, manager, self.alerts, self.faults, self.primary)
        self.preemption = PreemptionGuard(manager)
        self.watchdog_timeout_s = watchdog_timeout_s
        self.watchdog = Watchdog(watchdog_timeout_s, self._on_hang)
        self.stop_reason: str | None = None  # "preempted" | "halted"
        self.failure: str | None = None
        self.unsaved: list[int] = []
        self.last_step: int | None = None
        self.last_loss: float | None = None
        self._pending: collections.deque = collections.deque()
        self._steps_run = 0  # in this process: faults.preempt_after_steps counts these
        self._wandb_run = None
        self.discarded = discard_unfinished(self.disk.directory) if self.disk.local else []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RunGuard":
        self.preemption.install()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.watchdog.stop()
        self.preemption.uninstall()
        if isinstance(exc, KeyboardInterrupt):
            self.alerts.send("crash", "run interrupted", f"interrupted at step {self.last_step}", "WARN", self.last_step)
        elif exc is not None and not isinstance(exc, TrainingHalted):
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:1000]
            self.alerts.send("crash", "run crashed", f"{text} (last completed step {self.last_step})", "ERROR",
                             self.last_step)
        self.alerts.close()
        if exc is None and self.failure:
            raise TrainingHalted(self.failure)
        return False

    def start(self, step: int, wandb_run=None) -> None:
        """After restore and once the metrics writer exists."""
        self.last_step = step
        self.spikes.start(step)
        self._wandb_run = wandb_run
        self.alerts.attach_wandb(wandb_run)
        marker = os.path.join(self.workdir, PREEMPTED_MARKER)
        if os.path.exists(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            self.alerts.send("resumed", "resumed after preemption",
                             f"preempted at step {info.get('step', '?')} ({info.get('time', '?')}); "
                             f"resuming from checkpoint step {step}", "INFO", step)
            if self.primary:
                os.remove(marker)
        self.watchdog.start()

    def notify(self, title: str, text: str, level: str = "WARN", kind: str = "checkpoint") -> None:
        self.alerts.send(kind, title, text, level, self.last_step)

    # ------------------------------------------------------------------ the loop
    def before_step(self, step: int, train_data) -> None:
        self.faults.before_step(step, train_data)

    def next_batch(self, step: int, train_data):
        """The batch of 0-based `step`, past the batches a spike rollback skips."""
        return self.spikes.next_batch(step, train_data)

    def loss_ceiling(self):
        return self.steps.loss_ceiling()

    def lr_scale(self, step: int):
        """The learning-rate factor of 0-based `step` (below 1 for a while after a rollback)."""
        return self.spikes.lr_scale(step)

    def after_step(self, step: int, metrics: dict) -> None:
        keys = ("loss", "nonfinite", "update_skipped", "update_ratio", "learning_rate")
        self._pending.append((step, {k: metrics[k] for k in keys if k in metrics}))
        self._observe(keep=1)

    def rollback_target(self) -> int | None:
        """The checkpoint step to restore after a confirmed loss spike (None: carry on). Past the
        rollback limit the run halts instead: `should_stop` says so."""
        self._observe(keep=1)
        to_step = self.spikes.rollback_target()
        if self.spikes.verdict and self.stop_reason is None:
            self.stop_reason, self.failure = "halted", self.spikes.verdict
        return to_step

    def rolled_back(self, step: int) -> None:
        """After the loop restored checkpoint `step`: forget the discarded steps."""
        self._pending.clear()
        self.spikes.rolled_back(step)
        self.last_step = step

    def counters(self) -> dict[str, int]:
        """Cumulative (this session) skipped / non-finite / spike counts, for the metrics row."""
        self._observe()
        return {**self.steps.counters(), "spike_rollbacks": self.spikes.rollbacks}

    def should_stop(self, step: int) -> bool:
        """Call at every step on every process: they all answer the same."""
        self._steps_run += 1
        preempted = self.preemption.requested(step) or self._steps_run == self.faults.preempt_after_steps
        if self.stop_reason is None and preempted:
            self.stop_reason = "preempted"
        if self.stop_reason is None and self.steps.should_halt():
            self.stop_reason = "halted"
            self.failure = f"run halted at step {step}: {self.steps.halt_message()}"
            self.alerts.send("halt", "run halted: too many bad steps",
                             self.failure + "; saving a checkpoint and stopping", "ERROR", step)
        return self.stop_reason is not None

    def may_save(self, step: int, state, force: bool = False) -> bool:
        """Whether to save now: due (or forced) and there is room for it."""
        if not (force or self.manager.should_save(step)):
            return False
        if self.spikes.verdict:  # the newest checkpoint stays the last one before the spikes
            return False
        if self.stop_reason == "halted" and not _finite(state["params"]):
            log.error("not saving step %d: its parameters are not finite", step)
            return False
        latest = self.manager.latest_step()
        fits, needed, free = self.disk.check(state, latest, self.manager.is_saving_in_progress())
        if all_processes_ok(fits):
            return True
        self.unsaved.append(step)
        self.alerts.send("disk", "checkpoint skipped: disk full",
                         f"step {step}: a checkpoint needs about {human(needed)} but {self.disk.directory} has "
                         f"{human(free)} free; the save was skipped and the existing checkpoints are intact "
                         f"(newest: step {latest}). Free some space: the next save is tried as usual.",
                         "ERROR", step)
        return False

    def finish(self) -> None:
        """After the loop and `manager.wait_until_finished()`: the closing alert."""
        self._observe()
        self.watchdog.stop()
        step, saved = self.last_step, self.manager.latest_step()
        if self.stop_reason == "preempted":
            if self.primary:
                _write_json(os.path.join(self.workdir, PREEMPTED_MARKER),
                            {"step": step, "checkpoint": saved, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
            self.alerts.send("preempted", "preempted: checkpoint saved",
                             f"stopped at step {step} ({self.preemption.signal_name or 'preemption notice'}); "
                             f"newest checkpoint: step {saved}; the same command resumes", "WARN", step)
            if self._wandb_run is not None and hasattr(self._wandb_run, "mark_preempting"):
                try:
                    self._wandb_run.mark_preempting()
                except Exception as e:  # noqa: BLE001
                    log.warning("W&B mark_preempting failed: %s", e)
        elif self.stop_reason == "halted":
            self.failure += f"; newest checkpoint: step {saved}"
        elif self.unsaved and self.unsaved[-1] == step:
            self.failure = (f"the final checkpoint (step {step}) was not written for lack of disk space; "
                            f"newest checkpoint: step {saved}")
            self.alerts.send("final_checkpoint", "final checkpoint missing", self.failure, "ERROR", step)
        else:
            c = self.steps.counters()
            self.alerts.send("finished", "run finished",
                             f"reached step {step} (last loss {self.last_loss}); skipped steps {c['skipped_steps']}, "
                             f"loss spikes {c['loss_spikes']}, spike rollbacks {self.spikes.rollbacks}; newest "
                             f"checkpoint: step {saved}", "INFO", step)
        self.alerts.flush()

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    # ------------------------------------------------------------------ internals
    def _observe(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            step, m = self._pending.popleft()
            m = jax.device_get(m)
            loss = float(m["loss"])
            for e in self.steps.observe(step, loss, bool(m["nonfinite"]), bool(m["update_skipped"])):
                title = "step skipped: non-finite loss" if e.kind == "nonfinite" else "loss spike"
                self.alerts.send(e.kind, title, e.message, "WARN", e.step)
            self.spikes.observe(step, loss, m.get("update_ratio"), m.get("learning_rate"), bool(m["update_skipped"]))
            self.last_step, self.last_loss = step, loss
            self.watchdog.beat()

    def _on_hang(self, idle_s: float) -> None:
        """Watchdog thread: the main thread is stuck somewhere."""
        path = os.path.join(self.workdir, f"stacks_p{jax.process_index()}_{time.strftime('%Y%m%d-%H%M%S')}.txt")
        dump_stacks(path)
        self.alerts.send("watchdog", "run stalled: no progress",
                         f"no training step completed for {idle_s:.0f} s (RunGuard.watchdog_timeout_s = "
                         f"{self.watchdog_timeout_s:g}); last completed step {self.last_step}. Stacks of every "
                         f"thread: {path} and stderr. Exiting with status {EXIT_HUNG} so the job can be "
                         "restarted from the newest checkpoint.", "ERROR", self.last_step)
        self.alerts.flush(10)
        if self._wandb_run is not None:  # bounded: W&B itself may be what hangs
            t = threading.Thread(target=self._wandb_run.finish, kwargs={"exit_code": EXIT_HUNG}, daemon=True)
            t.start()
            t.join(15)
        end_child_processes()
        for h in logging.getLogger().handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(EXIT_HUNG)


def _finite(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
