"""The README's first command prints a short, readable account of the run; the rest goes to the
per-process log file (or to the terminal with --verbose)."""

import os
import subprocess
import sys

import pytest

from paths import REPO


SHORT = ["train.total_steps = 10", "train.eval_every = 5", "train.downstream_eval_every = 10",
         "downstream_eval.max_samples = 4", "downstream_eval.datasets = ('kinoe_arith',)",
         "CheckpointConfig.save_every = 5"]


def _run(workdir, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "WANDB_SILENT")}
    env.update(WANDB_MODE="offline")  # as a user's first run: W&B on, offline
    env.pop("WANDB_SERVICE", None)
    cmd = [sys.executable, "-m", "kinoe_jax.train", "--gin_file=gin_configs/runs/tiny_ja.gin",
           f"--workdir={workdir}", *[f"--gin_bindings={b}" for b in SHORT], *extra]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_the_tiny_run_is_calm_and_the_log_file_has_everything(tmp_path):
    text = _run(tmp_path / "calm")
    lines = [line for line in text.split("\n") if line.split("\r")[-1].strip()]  # bar redraws aside
    assert len(lines) < 40, "\n".join(lines)
    shown = "\n".join(line.split("\r")[-1] for line in lines)
    assert shown.count("training causal_lm of a 5.0M-parameter model") == 1
    for expected in ("step 5: eval_loss", "downstream/average", "step 10: checkpoint saved to",
                     "ALERT [finished]", "sample (greedy)"):
        assert expected in shown, expected
    for noise in ("absl", "cudart_stub", "oneDNN", "cuInit", "INFO", "wandb:", "Traceback", "libtpu"):
        assert noise not in text, noise
    log = (tmp_path / "calm" / "logs" / "process_0.log").read_text()
    assert "INFO absl" in log and "training causal_lm" in log


@pytest.mark.parametrize("verbose", [False, True], ids=["calm", "verbose"])
def test_console_filter(verbose, capsys):
    import logging

    from kinoe_jax.utils import console

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        console.setup(verbose)
        logging.getLogger("absl").info("Finished saving checkpoint")
        logging.getLogger("kinoe_jax.training.loop").info("mesh of 8 devices")
        logging.getLogger("kinoe_jax.training.loop").warning("a warning of ours")
        logging.getLogger("jax._src.xla_bridge").warning("a library warning")
        logging.getLogger("orbax").error("a library error")
        logging.getLogger("absl").error("Path not found: %s", "gin_configs/runs/tiny_ja.gin")
        console.say("step %d: checkpoint saved", 5)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    for always in ("a warning of ours", "a library error", "step 5: checkpoint saved"):
        assert always in err
    for chatter in ("Finished saving checkpoint", "mesh of 8 devices", "a library warning", "Path not found"):
        assert (chatter in err) == verbose, chatter
