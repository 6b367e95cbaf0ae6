"""DPO inherits the training loop's resilience: a SIGTERM saves and exits cleanly, and the
resumed run reproduces, bit for bit, the run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from paths import REPO
from reference_runs import DPO_GIN, dpo_bindings, dpo_reference, run_dpo

pytestmark = pytest.mark.slow

STEPS = 12  # the reference run's (test_dpo.dpo_reference)


def _losses(rows):
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _rows(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sigterm_saves_and_the_resumed_dpo_run_is_bitwise_the_uninterrupted_one(tmp_path):
    run = dpo_reference()
    reference, full = run["sft"], _losses(run["rows"])
    assert sorted(full) == list(range(1, STEPS + 1))

    work = str(tmp_path / "cut")
    cmd = [sys.executable, "-m", "kinoe_jax.dpo", f"--gin_file={DPO_GIN}", f"--workdir={work}",
           *[f"--gin_bindings={b}" for b in dpo_bindings(reference) + ["faults.step_delay_s = 0.5"]]]
    env = dict(os.environ, WANDB_MODE="disabled")
    with open(tmp_path / "cut.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while len(_rows(work)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    log_text = (tmp_path / "cut.log").read_text(errors="replace")
    assert rc == 0, log_text[-3000:]
    stopped = _rows(work)[-1]["step"]
    assert 3 <= stopped < STEPS, f"stopped at {stopped}"
    entries = os.listdir(os.path.join(work, "checkpoints"))
    assert str(stopped) in entries and not [e for e in entries if "tmp" in e]
    with open(os.path.join(work, "alerts.jsonl")) as f:
        alerts = [json.loads(line) for line in f]
    assert alerts[-1]["kind"] == "preempted" and f"stopped at step {stopped} (SIGTERM)" in alerts[-1]["text"]

    resumed = _losses(run_dpo(work, reference))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} != {full[step]} (must be bitwise)"
