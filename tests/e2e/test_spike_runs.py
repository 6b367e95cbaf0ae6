"""Loss spikes end to end, by fault injection.

* tiny_ja, the whole run (`python -m kinoe_jax.train --gin_file=gin_configs/runs/tiny_ja.gin`,
  two processes side by side): one clean, one whose batches 61-64 get random targets, so the
  loss spikes while staying finite. The poisoned run must detect the spike, roll back, skip and
  record those batches, and end within 2% of the clean run's validation loss; the clean run must
  never roll back at the default thresholds.
* A small model: a run that rolls back, and the same run preempted after its rollback (before
  the skipped window comes up) and resumed, must log the same losses at every step.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_training
from paths import REPO

pytestmark = pytest.mark.slow

POISON = (61, 4)  # batches 61-64 of tiny_ja's 120: after the checkpoint at 40, before the one at 80
TINY_JA_TIMEOUT_S = 3600


def _rows(workdir, name="metrics.jsonl"):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tiny_ja_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ja_spikes")
    runs = {"clean": [], "poisoned": [f"faults.poison_batches_from = {POISON[0]}",
                                      f"faults.poison_batches_count = {POISON[1]}"]}
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("XLA_FLAGS", None)  # the user's command: one CPU device, not the tests' eight
    procs = {}
    for name, bindings in runs.items():
        cmd = [sys.executable, "-m", "kinoe_jax.train", "--gin_file=gin_configs/runs/tiny_ja.gin",
               "--gin_bindings=MetricsWriter.use_wandb = False", "--gin_bindings=MetricsWriter.progress = False",
               *[f"--gin_bindings={b}" for b in bindings], f"--workdir={root / name}"]
        log = open(root / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + TINY_JA_TIMEOUT_S
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        assert proc.returncode == 0, f"{name} run failed:\n" + (root / f"{name}.log").read_text()[-3000:]
    return {name: str(root / name) for name in runs}


def test_a_clean_tiny_ja_run_never_rolls_back(tiny_ja_runs):
    clean = tiny_ja_runs["clean"]
    rows = _rows(clean)
    assert rows[-1]["step"] == 120 and rows[-1]["spike_rollbacks"] == 0
    assert not os.path.exists(os.path.join(clean, "spike_rollbacks.json"))
    assert not os.path.exists(os.path.join(clean, "skipped_data.jsonl"))
    # The statistics reach metrics.jsonl for every group of the Mistral stack.
    for group in ("attention", "mlp", "norms", "embeddings", "head"):
        assert rows[-1][f"stats/{group}/update_ratio"] > 0


def test_a_poisoned_tiny_ja_run_rolls_back_skips_and_recovers(tiny_ja_runs):
    clean, poisoned = tiny_ja_runs["clean"], tiny_ja_runs["poisoned"]
    with open(os.path.join(poisoned, "spike_rollbacks.json")) as f:
        plan = json.load(f)
    first = plan["rollbacks"][0]
    assert POISON[0] <= first["onset_step"] < POISON[0] + POISON[1]
    assert first["to_checkpoint"] < first["onset_step"]
    poisoned_batches = set(range(POISON[0], POISON[0] + POISON[1]))
    assert poisoned_batches <= set(plan["skipped"])
    recorded = _rows(poisoned, "skipped_data.jsonl")
    assert {r["batch"] for r in recorded} == set(plan["skipped"])
    assert all(len(r["fingerprint"]) == 16 and r["skipped_before_step"] <= r["batch"] for r in recorded)
    # The spike stayed finite and no step was skipped: only the detector could catch it.
    assert np.isfinite(first["loss"]) and first["z"] > 5
    assert _rows(poisoned)[-1]["nonfinite_steps"] == 0 and _rows(poisoned)[-1]["skipped_steps"] == 0
    assert _rows(poisoned, "rolled_back_metrics.jsonl")  # the discarded timeline, kept for the forensics
    alerts = [a for a in _rows(poisoned, "alerts.jsonl") if a["kind"] == "rollback"]
    assert alerts and f"step {first['detected_at_step']}" in alerts[0]["text"]
    assert f"checkpoint step {first['to_checkpoint']}" in alerts[0]["text"]
    final = {name: [r["eval_loss"] for r in _rows(d) if "eval_loss" in r][-1]
             for name, d in (("clean", clean), ("poisoned", poisoned))}
    assert abs(final["poisoned"] - final["clean"]) <= 0.02 * final["clean"], final
    assert _rows(poisoned)[-1]["step"] == 120 and os.path.exists(os.path.join(poisoned, "loss.png"))


# ----------------------------------------------------------------------------- exact resume
SMALL = ["train.total_steps = 40", "CheckpointConfig.save_every = 10", "faults.poison_batches_from = 26",
         "faults.poison_batches_count = 3", "SpikeDetector.min_history = 10", "SpikeRollback.skip_before = 2",
         "SpikeRollback.lr_factor = 0.5", "SpikeRollback.lr_steps = 5"]


def test_a_resume_after_a_rollback_logs_the_same_losses(tmp_path):
    ref = run_training(tmp_path / "ref", SMALL)
    with open(tmp_path / "ref" / "spike_rollbacks.json") as f:
        plan = json.load(f)
    assert len(plan["rollbacks"]) == 1 and plan["rollbacks"][0]["to_checkpoint"] == 20
    assert {26, 27, 28} <= set(plan["skipped"]) and min(plan["skipped"]) == 24  # replays 21-23 first

    # The same run, preempted two steps into the replay: the skips are still ahead of it.
    stop = SMALL + ["faults.preempt_after_steps = 30"]
    part = run_training(tmp_path / "resumed", stop)
    assert 20 < part[-1]["step"] < 24
    resumed = run_training(tmp_path / "resumed", stop)
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in ref]
    assert [r["learning_rate"] for r in resumed] == [r["learning_rate"] for r in ref]
    batches = [[(r["batch"], r["fingerprint"]) for r in _rows(d, "skipped_data.jsonl")]
               for d in (tmp_path / "ref", tmp_path / "resumed")]
    assert batches[0] == batches[1] and len(batches[0]) == len(plan["skipped"])
