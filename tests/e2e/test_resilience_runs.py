"""Fault injection end to end: real training processes are signalled, killed, stalled, fed NaNs,
given a disk that is too small and damaged checkpoints.

To stay within a few minutes on two cores, one module fixture runs the scenarios in two waves of
concurrent processes (`python -m kinoe_jax.train`, the user's command):

  wave 1   ref    uninterrupted; never applies the 3rd batch (it is dropped from the stream)
           pre    NaN gradients at step 3; SIGTERM once 4 steps are logged; W&B offline
           kill   async saves; the commit of the 3rd save is held; kill -9 while it is held
  wave 2   pre    the same command again: resumes and finishes
           kill   the same command again, with a stall before step 4 and a short watchdog
           disk   (in this process) a checkpoint filesystem too small for the third save
           halt   (in this process) NaN gradients from step 3 on, at most 3 bad steps in a row

The tests below then check what each left behind.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from conftest import TEST_MODEL, run_training
from paths import REPO
from wandb_log import wandb_alerts

pytestmark = pytest.mark.slow

STEPS = 8
BASE = [f"train.total_steps = {STEPS}", "CheckpointConfig.save_every = 100"]
KILL = [f"train.total_steps = {STEPS}", "CheckpointConfig.save_every = 2", "CheckpointConfig.async_save = True"]
WANDB = ["MetricsWriter.use_wandb = True"]
WATCHDOG_S = 8
EXIT_HUNG = 75


class Proc:
    """One training process: its command, output file, exit status and the processes it started."""

    def __init__(self, workdir, bindings, name, wandb=False):
        self.workdir, self.name = str(workdir), name
        self.log = os.path.join(os.path.dirname(self.workdir), f"{name}.log")
        env = dict(os.environ, WANDB_MODE="offline" if wandb else "disabled")
        env.pop("WANDB_SERVICE", None)  # set by a W&B run in this process: the child would borrow its service
        cmd = [sys.executable, "-m", "kinoe_jax.train", "--gin_file=gin_configs/mesh/data_parallel.gin",
               *[f"--gin_bindings={b}" for b in TEST_MODEL + list(bindings)], f"--workdir={self.workdir}"]
        self.out = open(self.log, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT)
        self.children: dict[int, float] = {}  # pid -> create_time, to tell a reused pid apart
        self.ended = None
        self._lock = threading.Lock()

    def poll(self):
        with self._lock:
            if self.proc.poll() is None:
                try:
                    for c in psutil.Process(self.proc.pid).children(recursive=True):
                        self.children.setdefault(c.pid, c.create_time())
                except psutil.Error:
                    pass
            elif self.ended is None:
                self.ended = time.monotonic()
                self.out.close()
            return self.proc.returncode

    @property
    def rc(self):
        return self.proc.returncode

    def rows(self):
        path = os.path.join(self.workdir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def output(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def leftover_children(self, grace_s=15.0):
        deadline = time.monotonic() + grace_s
        while True:
            alive = []
            for pid, created in self.children.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
                except psutil.Error:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.poll()


def _wait_all(procs, timeout_s, actions=()):
    """Poll until every process has exited; `actions` are (condition, action) pairs fired once."""
    pending = list(actions)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [p.poll() is not None for p in procs]
        for item in list(pending):
            if item[0]():
                item[1]()
                pending.remove(item)
        if all(done):
            return
        time.sleep(0.1)
    for p in procs:
        p.stop()
    raise AssertionError(f"timed out after {timeout_s} s: {[p.name for p in procs if p.rc is None or p.rc < 0]}")


class Poller(threading.Thread):
    """Keeps noting each process's children (and exit time) while this process does other work."""

    def __init__(self, procs):
        super().__init__(daemon=True)
        self.procs, self.halt = procs, threading.Event()

    def run(self):
        while not self.halt.wait(0.1):
            for p in list(self.procs.values()):
                p.poll()


def _held_commit(workdir, proc) -> bool:
    """Step 4's files are written and its commit is being held (cheap checks first)."""
    ckpts = os.path.join(str(workdir), "checkpoints")
    if not os.path.isdir(ckpts) or not any(n.startswith("4.") for n in os.listdir(ckpts)):
        return False
    return "holding an async checkpoint" in proc.output()


def _mount_small_fs(path, size_bytes) -> bool:
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def _disk_scenario(root):
    """Checkpoints on a filesystem with room for two of them (plus the first estimate's margin)."""
    workdir = root / "disk"
    ckpt_dir = workdir / "checkpoints"
    capacity = 17 * 2 ** 20  # a checkpoint of the test model is about 6.3 MiB
    mounted = _mount_small_fs(ckpt_dir, capacity)
    bindings = ["train.total_steps = 6", "CheckpointConfig.save_every = 2", "CheckpointConfig.keep = 5"]
    if not mounted:  # no root: the same arithmetic on a simulated capacity
        bindings.append(f"DiskGuard.simulate_capacity_bytes = {capacity}")
    result = {"workdir": workdir, "tmpfs": mounted}
    try:
        run_training(workdir, bindings)
    except Exception as e:  # noqa: BLE001 - the test inspects it
        result["error"] = e
    result["steps"] = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    result["entries"] = sorted(os.listdir(ckpt_dir))
    return result


def _halt_scenario(root):
    workdir = root / "halt"
    result = {"workdir": workdir}
    try:
        run_training(workdir, BASE + ["faults.nan_grad_at_step = 3", "faults.nan_grad_count = 100",
                                      "StepGuard.max_consecutive_skips = 3"])
    except Exception as e:  # noqa: BLE001 - the test inspects it
        result["error"] = e
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience_runs")
    procs = {}
    marks = {}
    poller = Poller(procs)
    poller.start()
    try:
        # ---- wave 1
        procs["ref"] = Proc(root / "ref", BASE + ["faults.nan_grad_at_step = 1000000", "faults.drop_batch_at_step = 3"],
                            "ref")
        procs["pre"] = Proc(root / "pre", BASE + WANDB + ["faults.nan_grad_at_step = 3", "faults.step_delay_s = 0.5"],
                            "pre", wandb=True)
        procs["kill"] = Proc(root / "kill", KILL + ["faults.slow_commit_from = 3", "faults.slow_commit_s = 600"], "kill")

        def term():
            marks["term_at"], marks["term_wall"] = time.monotonic(), time.time()
            procs["pre"].proc.send_signal(signal.SIGTERM)

        def kill9():
            entries = os.listdir(root / "kill" / "checkpoints")
            marks["kill_entries"] = sorted(entries)
            marks["kill_rows"] = procs["kill"].rows()
            procs["kill"].proc.send_signal(signal.SIGKILL)

        _wait_all(list(procs.values()), 900, actions=[
            (lambda: len(procs["pre"].rows()) >= 4, term),
            (lambda: _held_commit(root / "kill", procs["kill"]), kill9),
        ])
        marks["pre_rows"] = procs["pre"].rows()
        marks["pre_entries"] = sorted(os.listdir(root / "pre" / "checkpoints"))
        marks["pre_alerts"] = _alerts(root / "pre")
        marks["pre_leftovers"] = procs["pre"].leftover_children()
        marks["pre_output"] = procs["pre"].output()
        first = {name: p for name, p in procs.items()}

        # ---- wave 2 (the disk scenario runs here, in this process, meanwhile)
        procs["pre2"] = Proc(root / "pre", BASE + WANDB + ["faults.nan_grad_at_step = 3"], "pre2", wandb=True)
        procs["kill2"] = Proc(root / "kill", KILL + WANDB + ["faults.hang_at_step = 4",
                                                              f"RunGuard.watchdog_timeout_s = {WATCHDOG_S}"],
                              "kill2", wandb=True)
        wave2 = [procs["pre2"], procs["kill2"]]
        disk = _disk_scenario(root)
        halt = _halt_scenario(root)
        _wait_all(wave2, 900)
        yield {"root": root, "procs": procs, "first": first, "marks": marks, "disk": disk, "halt": halt}
    finally:
        poller.halt.set()
        for p in procs.values():
            p.stop()
        ckpt = root / "disk" / "checkpoints"
        if os.path.ismount(ckpt):
            subprocess.run(["umount", str(ckpt)], check=False)


def _alerts(workdir):
    path = os.path.join(str(workdir), "alerts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(rows):
    return {r["step"]: r["loss"] for r in rows}


# ----------------------------------------------------------------------------- preemption
def test_sigterm_finishes_the_step_saves_and_exits_zero(runs):
    pre, m = runs["first"]["pre"], runs["marks"]
    assert pre.rc == 0, pre.output()[-3000:]
    # What a grace period must cover: the step, the save and its commit (the alert comes after it).
    # Leaving the process (W&B, plot, interpreter teardown) takes a few seconds more on a quiet machine.
    committed = [a["time"] for a in m["pre_alerts"] if a["kind"] == "preempted"]
    assert committed and committed[0] - m["term_wall"] < 30, "too slow to save after SIGTERM"
    assert pre.ended - m["term_at"] < 180, "too slow to exit after SIGTERM"
    stopped = m["pre_rows"][-1]["step"]
    assert 4 <= stopped < STEPS
    # The step it stopped at is committed (no half-written directory left), and the run said so.
    assert str(stopped) in m["pre_entries"] and not [e for e in m["pre_entries"] if "tmp" in e]
    kinds = [a["kind"] for a in m["pre_alerts"]]
    assert "preempted" in kinds and f"stopped at step {stopped} (SIGTERM)" in m["pre_alerts"][-1]["text"]
    assert m["pre_leftovers"] == [], "processes left behind after the preempted run (W&B's service?)"
    assert pre.children, "expected W&B's service among the children (is W&B offline on?)"


def test_resume_and_nan_skip_reproduce_the_run_that_never_saw_that_batch(runs):
    """Steps 1-2 equal the reference; step 3's update is skipped; from then on step k+1 equals the
    reference's step k exactly, across the preemption and resume."""
    procs = runs["procs"]
    assert procs["ref"].rc == 0 and procs["pre2"].rc == 0, procs["pre2"].output()[-3000:]
    ref, got = _losses(procs["ref"].rows()), procs["pre2"].rows()
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    loss = _losses(got)
    assert loss[1] == ref[1] and loss[2] == ref[2]
    for k in range(3, STEPS):
        assert loss[k + 1] == ref[k], f"step {k + 1} ({loss[k + 1]}) != reference step {k} ({ref[k]})"
    skipped = [r["step"] for r in got if r["update_skipped"] == 1.0]
    assert skipped == [3] and got[2]["nonfinite"] == 1.0 and not np.isfinite(got[2]["grad_norm"])
    assert runs["marks"]["pre_rows"][2]["skipped_steps"] == 1  # counted in the session that saw it
    assert f"resumed from {runs['root'] / 'pre' / 'checkpoints'} at step {runs['marks']['pre_rows'][-1]['step']}" \
        in procs["pre2"].output()
    assert procs["pre2"].leftover_children() == []


def test_alerts_reach_the_alert_log_and_wandb_offline(runs):
    workdir = runs["root"] / "pre"
    kinds = [a["kind"] for a in _alerts(workdir)]
    assert kinds == ["nonfinite", "preempted", "resumed", "finished"]
    titles = [t for t, _, _ in wandb_alerts(workdir)]
    for expected in ("step skipped: non-finite loss", "preempted: checkpoint saved", "resumed after preemption",
                     "run finished"):
        assert any(t.endswith(expected) for t in titles), (expected, titles)
    assert [a["kind"] for a in _alerts(runs["root"] / "ref")] == ["finished"]


# ----------------------------------------------------------------------------- crash mid-save, stall
def test_kill9_during_async_save_resumes_from_the_last_commit(runs):
    m, kill2 = runs["marks"], runs["procs"]["kill2"]
    assert runs["first"]["kill"].rc == -signal.SIGKILL
    # At the kill, step 4 was written but not committed; steps 1 and 2 were.
    assert "1" in m["kill_entries"] and "2" in m["kill_entries"]
    assert any(e.startswith("4.") and "tmp" in e for e in m["kill_entries"]), m["kill_entries"]
    out = kill2.output()
    assert "discarding 1 unfinished save(s)" in out and f"resumed from {runs['root'] / 'kill' / 'checkpoints'} at step 2" in out
    before, after = _losses(m["kill_rows"]), _losses(kill2.rows())
    assert sorted(after) == [1, 2, 3] and after[3] == before[3]  # the redone step is the same step


def test_a_stalled_step_fires_the_watchdog(runs):
    kill2 = runs["procs"]["kill2"]
    assert kill2.rc == EXIT_HUNG, kill2.output()[-3000:]
    out = kill2.output()
    assert "watchdog: stacks of all threads" in out and "Thread 0x" in out
    stacks = glob.glob(str(runs["root"] / "kill" / "stacks_p0_*.txt"))
    assert len(stacks) == 1 and "before_step" in open(stacks[0]).read()  # where the main thread was stuck
    last_row_at = os.path.getmtime(runs["root"] / "kill" / "metrics.jsonl")
    ended_at = time.time() - (time.monotonic() - kill2.ended)
    assert WATCHDOG_S - 1 <= ended_at - last_row_at < WATCHDOG_S + 45
    alert = [a for a in _alerts(runs["root"] / "kill") if a["kind"] == "watchdog"]
    assert len(alert) == 1 and alert[0]["level"] == "ERROR" and "last completed step 3" in alert[0]["text"]
    assert kill2.children and kill2.leftover_children() == []  # W&B's service went with it


# ----------------------------------------------------------------------------- disk space
def test_a_full_disk_skips_the_save_alerts_and_keeps_the_checkpoints(runs):
    from kinoe_jax.training.resilience import TrainingHalted

    disk = runs["disk"]
    assert isinstance(disk.get("error"), TrainingHalted), disk.get("error")
    assert "final checkpoint (step 6) was not written" in str(disk["error"])
    assert disk["steps"] == [1, 2] and not [e for e in disk["entries"] if "tmp" in e]
    alerts = _alerts(disk["workdir"])
    full = [a for a in alerts if a["kind"] == "disk"]
    assert full and full[0]["step"] == 4 and "existing checkpoints are intact" in full[0]["text"]
    assert [a["suppressed"] for a in full] == [False, True]  # step 6: rate-limited
    assert any(a["kind"] == "final_checkpoint" for a in alerts)
    # The kept checkpoint still restores.
    state, step = _restore_latest(disk["workdir"] / "checkpoints")
    assert step == 2 and int(state["step"]) == 2


# ----------------------------------------------------------------------------- too many bad steps
def test_consecutive_bad_steps_stop_the_run_with_a_good_checkpoint(runs):
    import jax

    from kinoe_jax.training.resilience import TrainingHalted

    halt = runs["halt"]
    err = halt.get("error")
    assert isinstance(err, TrainingHalted), err
    for needle in ("run halted at step 5: 3 consecutive steps skipped", "non-finite",
                   "the parameters are those after step 2", "newest checkpoint: step 5"):
        assert needle in str(err)
    with open(halt["workdir"] / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["update_skipped"] for r in rows] == [0, 0, 1, 1, 1]
    alerts = _alerts(halt["workdir"])
    assert [(a["kind"], a["suppressed"]) for a in alerts] == [("nonfinite", False), ("nonfinite", True),
                                                              ("nonfinite", True), ("halt", False)]
    state, step = _restore_latest(halt["workdir"] / "checkpoints")
    assert step == 5 and int(state["step"]) == 5
    # Exactly the two good updates reached the optimizer, and nothing non-finite was saved.
    counts = {int(x) for path, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
              if "count" in jax.tree_util.keystr(path)}
    assert counts == {2}
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# ----------------------------------------------------------------------------- damaged checkpoints
def _restore_latest(ckpt_dir, notify=None):
    import gin
    import jax

    from kinoe_jax.training import checkpoint as ckpt
    from kinoe_jax.training import optim
    from kinoe_jax.training import state as state_lib
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.data import pipeline, pretraining as tasks
    from kinoe_jax.models import ModelConfig, Transformer
    from kinoe_jax.parallel.mesh import make_mesh

    gin.clear_config()
    load_gin([], TEST_MODEL)
    try:
        cfg, data = ModelConfig(), pipeline.DataConfig()
        mesh, model = make_mesh(), Transformer(ModelConfig())
        tx, _ = optim.make_optimizer(STEPS)
        abstract, _, _ = state_lib.abstract_state(model, cfg, tx, mesh, data.seq_len, False, 0)
        tasks.register_builtin()
        data_iter = iter(pipeline.train_dataset(data))
        manager = ckpt.make_manager(str(ckpt_dir), ckpt.CheckpointConfig(async_save=False))
        with jax.set_mesh(mesh):
            return ckpt.restore_newest_good(manager, abstract, data_iter, notify=notify)
    finally:
        gin.clear_config()


def test_damaged_checkpoints_fall_back_to_the_newest_good_one(runs, tmp_path):
    from kinoe_jax.training.resilience.integrity import CheckpointUnusableError

    src = runs["root"] / "pre" / "checkpoints"
    steps = sorted(int(n) for n in os.listdir(src) if n.isdigit())
    assert len(steps) == 3 and steps[-1] == STEPS  # 1 (Orbax's initial save), the preemption, the end
    work = tmp_path / "checkpoints"
    shutil.copytree(src, work)
    newest, middle, oldest = (work / str(s) for s in reversed(steps))
    data_files = sorted(glob.glob(str(newest / "state" / "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)
    os.truncate(data_files[-1], os.path.getsize(data_files[-1]) // 2)  # a truncated array file
    os.remove(middle / "data_iter" / "shard_0-of-1" / "iterator.index")  # a missing file

    told = []
    state, step = _restore_latest(work, notify=lambda *a: told.append(a))
    assert step == steps[0] and int(state["step"]) == steps[0]
    assert len(told) == 1 and f"step(s) {[steps[2], steps[1]]}" in told[0][1] and "Resumed from step" in told[0][1]
    assert sorted(int(n) for n in os.listdir(work) if n.isdigit()) == [steps[0]]
    moved = sorted(os.listdir(tmp_path / "corrupt_checkpoints"))
    assert [n.split("-")[0] for n in moved] == [str(steps[1]), str(steps[2])]  # kept for inspection

    # None readable: refuse to start from scratch, and move nothing.
    os.remove(oldest / "state" / "manifest.ocdbt")
    with pytest.raises(CheckpointUnusableError, match="Refusing to start from scratch"):
        _restore_latest(work)
    assert os.path.isdir(oldest)


# ----------------------------------------------------------------------------- several processes
_PREEMPT_SCRIPT = r"""
import os, signal, sys, time
import jax
pid, port, use_service, ckdir = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
jax.config.update("jax_enable_preemption_service", use_service)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import orbax.checkpoint as ocp
from kinoe_jax.training.resilience.preemption import PreemptionGuard
guard = PreemptionGuard(ocp.CheckpointManager(ckdir))
guard.install()
for step in range(1, 600):
    time.sleep(0.02)
    if guard.requested(step):
        print(f"STOP {step} service={guard._use_service}", flush=True)
        break
    if step == 10 and pid == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # only one process is told
else:
    print("NEVER STOPPED", flush=True)
"""


@pytest.mark.parametrize("service", [True, False], ids=["jax_service", "allgather"])
def test_every_process_stops_at_the_same_step(tmp_path, service):
    import socket

    script = tmp_path / "preempt.py"
    script.write_text(_PREEMPT_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), "1" if service else "0",
                               str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stops = [[line for line in out.splitlines() if line.startswith("STOP")] for out in outs]
    assert all(len(s) == 1 for s in stops), outs
    assert stops[0] == stops[1], stops  # the same step, service flag, on both
    assert int(stops[0][0].split()[1]) >= 10 and f"service={service}" in stops[0][0]
