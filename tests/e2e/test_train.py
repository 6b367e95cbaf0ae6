"""The training loop end to end: exact resume, restore onto another mesh, outputs, config errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_training
from paths import REPO


def _losses(rows):
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_resume_is_exact(tmp_path, caplog):
    full = _losses(run_training(tmp_path / "full", ["train.total_steps = 6", "CheckpointConfig.save_every = 3"]))
    part = tmp_path / "part"
    run_training(part, ["train.total_steps = 3", "CheckpointConfig.save_every = 3"])
    assert (part / "checkpoints" / "3").is_dir()
    # The same command with a larger step budget continues from step 3 with the same data,
    # and says that the schedule is not the one the checkpoint was on.
    with caplog.at_level("WARNING", logger="kinoe_jax.training.schedule_check"):
        resumed = _losses(run_training(part, ["train.total_steps = 6", "CheckpointConfig.save_every = 3"]))
    assert "resuming at step 3 under a changed schedule: train.total_steps 3 -> 6" in caplog.text
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == full[step], f"step {step}: {resumed[step]} != {full[step]} (must be bitwise)"


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path):
    base = ["train.total_steps = 4", "CheckpointConfig.save_every = 2"]
    dp = ["make_mesh.data = 8", "make_mesh.fsdp = 1"]
    fsdp = ["make_mesh.data = 1", "make_mesh.fsdp = 4", "make_mesh.tensor = 2"]
    ref = _losses(run_training(tmp_path / "ref", base + dp))
    work = tmp_path / "moved"
    run_training(work, ["train.total_steps = 2", "CheckpointConfig.save_every = 2"] + dp)
    moved = _losses(run_training(work, base + fsdp))
    for step in (3, 4):
        np.testing.assert_allclose(moved[step], ref[step], rtol=1e-5)


def test_outputs_of_a_run(tmp_path):
    work = tmp_path / "run"
    rows = run_training(work, ["train.total_steps = 4", "train.eval_every = 4", "CheckpointConfig.save_every = 2",
                               "CheckpointConfig.keep = 1", "train.sample_prompt = '日本'",
                               "train.sample_tokens = 4", "train.downstream_eval_every = 4",
                               "downstream_eval.max_samples = 2", "downstream_eval.max_new_tokens = 4",
                               "downstream_eval.datasets = ('kinoe_arith', 'kinoe_commonsense_mc')"])
    keys = {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"}
    assert all(keys <= set(r) for r in rows)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "eval_loss" in rows[-1] and np.isfinite(rows[-1]["eval_loss"])
    # Downstream scores of the live parameters at the same step, in the metrics and the plot.
    downstream = {k for k in rows[-1] if k.startswith("downstream/")}
    assert {"downstream/kinoe_arith/exact_match_figure", "downstream/kinoe_commonsense_mc/choice_accuracy",
            "downstream/average"} <= downstream
    assert 0.0 <= rows[-1]["downstream/average"] <= 1.0 and not any("downstream/" in k for k in rows[-2])
    assert sorted(os.listdir(work / "checkpoints")) == ["4"]  # keep = 1
    config = (work / "config.gin").read_text()
    assert "ModelConfig.hidden_size = 64" in config and "train.total_steps = 4" in config
    assert (work / "loss.png").stat().st_size > 1000
    assert (work / "tokenizer.model").exists()


def test_generate_cli_reads_a_workdir(tmp_path):
    work = tmp_path / "run"
    run_training(work, ["train.total_steps = 2", "CheckpointConfig.save_every = 2"])
    out = subprocess.run([sys.executable, "-m", "kinoe_jax.generate", f"--workdir={work}", "--prompt=今日は",
                          "--max_new_tokens=5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("今日は")


def test_unknown_gin_binding_fails_before_compiling(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kinoe_jax.train", "--gin_file=gin_configs/runs/tiny_ja.gin",
                          "--gin_bindings=train.no_such_option = 1", f"--workdir={tmp_path}/w"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no_such_option" in out.stderr
    assert not (tmp_path / "w").exists()


def test_missing_gin_file_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kinoe_jax.train", "--gin_file=gin_configs/runs/nope.gin",
                          f"--workdir={tmp_path}/w"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "--gin_file=gin_configs/runs/nope.gin: no such file" in out.stderr


def test_schedules():
    from kinoe_jax.config.decay import wsd_decay_start
    from kinoe_jax.training.optim import cosine_schedule, wsd_schedule

    wsd = wsd_schedule(total_steps=100, peak_lr=1.0, warmup_steps=10, decay_fraction=0.2, final_lr=0.01)
    assert float(wsd(5)) == pytest.approx(0.5)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)
    assert wsd_decay_start(100, 0.2) == 80
    assert float(wsd(100)) == pytest.approx(0.01, rel=1e-4)
    assert 0.01 < float(wsd(90)) < 1.0
    lin = wsd_schedule(total_steps=100, peak_lr=1.0, warmup_steps=10, decay_fraction=0.2, final_lr=0.0, decay="linear")
    assert float(lin(90)) == pytest.approx(0.5)
    cos = cosine_schedule(total_steps=100, peak_lr=1.0, warmup_steps=10, final_lr=0.1)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.1, rel=1e-3)


def test_weight_decay_mask_spares_norms_and_embeddings():
    from kinoe_jax.training.optim import decay_mask

    params = {"embed": {"embedding": 1}, "final_norm": {"scale": 1}, "layers": {"layer": {
        "attn": {"q_proj": {"kernel": 1}}, "mlp_norm": {"scale": 1}}}, "lm_head": {"kernel": 1}}
    mask = decay_mask(params)
    assert mask["layers"]["layer"]["attn"]["q_proj"]["kernel"] and mask["lm_head"]["kernel"]
    assert not mask["embed"]["embedding"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["layer"]["mlp_norm"]["scale"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    one = _losses(run_training(tmp_path / "a", ["train.total_steps = 2", "DataConfig.grad_accum = 1"]))
    four = _losses(run_training(tmp_path / "b", ["train.total_steps = 2", "DataConfig.grad_accum = 4"]))
    for step in (1, 2):
        np.testing.assert_allclose(four[step], one[step], rtol=1e-5)


def test_wandb_offline_run_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    work = tmp_path / "run"
    run_training(work, ["train.total_steps = 2", "CheckpointConfig.save_every = 2", "MetricsWriter.use_wandb = True"])
    runs = list((work / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run has no history file"
    # A resumed run continues the same W&B run id.
    assert (work / "wandb_run_id").read_text().strip() in runs[0].name
