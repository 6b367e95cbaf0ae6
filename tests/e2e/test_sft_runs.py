"""A tiny pretraining run followed by a tiny SFT run from its checkpoint (on the built-in senryu
set): the runs themselves live in reference_runs.py, made once per session for the tests that
reuse them."""

import os

import gin
import numpy as np
import pytest

from conftest import TEST_MODEL
from paths import REPO
from reference_runs import SENRYU, SFT_BINDINGS, SFT_STEPS, sft_runs

from kinoe_jax.data import pipeline
from kinoe_jax.sft import tasks

@pytest.mark.slow
def test_sft_run_from_a_pretrained_checkpoint():
    runs = sft_runs()
    log = runs["log"]
    assert any("initialised parameters from" in m and runs["pre"] in m for m in log)
    # Senryu items longer than 64 tokens are reported by file:line, not trained on.
    assert any("too_long" in m and "senryu.jsonl:" in m for m in log)
    losses = [r["loss"] for r in runs["sft_rows"]]
    assert len(losses) == SFT_STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    assert losses[0] < runs["pre_rows"][0]["loss"]  # it starts from the pretrained weights
    assert os.path.isdir(os.path.join(runs["sft"], "checkpoints", str(SFT_STEPS)))

    # The trainer's token count is the assistant-token count of the same first batch.
    from kinoe_jax.config.gin_io import load_gin

    load_gin([os.path.join(REPO, "gin_configs/models/tiny_ja.gin")], TEST_MODEL + SFT_BINDINGS)
    tasks.register_sft_task("sft_senryu", SENRYU)
    first = next(iter(pipeline.train_dataset(pipeline.DataConfig())))
    weights = np.asarray(first["decoder_loss_weights"])
    assert runs["sft_rows"][0]["num_tokens"] == weights.sum() < 0.75 * weights.size
    gin.clear_config()


@pytest.mark.slow
def test_generate_chat_cli_answers_from_the_sft_workdir(capsys):
    from kinoe_jax import generate

    reply = generate.main([f"--workdir={sft_runs()['sft']}", "--chat", "--system=短く答えます。",
                           "--prompt=猫の川柳をお願いします。", "--max_new_tokens=5"])
    assert isinstance(reply, str) and "<|" not in reply
    assert capsys.readouterr().out.strip() == reply.strip()
