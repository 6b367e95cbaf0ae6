"""A tiny pretraining run followed by a tiny SFT run from its checkpoint (on the built-in senryu
set). The runs are made once per test session and reused by the DPO and MT-Bench tests."""

import atexit
import logging
import os
import shutil
import tempfile

import gin
import numpy as np
import pytest

from conftest import REPO, TEST_MODEL, run_training

from kinoe_jax.data import pipeline
from kinoe_jax.sft import tasks

SENRYU = os.path.join(tasks.BUILTIN_SFT_DIR, "senryu.jsonl")
SFT_STEPS = 12
SFT_BINDINGS = [
    "make_feature_converter.converter_cls = @SftFeatureConverter",
    "task_feature_lengths.features = ('targets', 'trained_on')",
    "train.register_tasks = @register_sft_task",
    "register_sft_task.name = 'sft_senryu'",
    f"register_sft_task.train_pattern = '{SENRYU}'",
    "DataConfig.mixture = 'sft_senryu'",
    "DataConfig.seq_len = 64",
    "DataConfig.global_batch = 8",
    f"train.total_steps = {SFT_STEPS}",
    f"CheckpointConfig.save_every = {SFT_STEPS}",
    "cosine_schedule.peak_lr = 3e-3",
]
_RUNS: dict = {}


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def sft_runs() -> dict:
    """{"pre": dir, "sft": dir, "pre_rows", "sft_rows", "log": [messages of the SFT run]}."""
    if not _RUNS:
        root = tempfile.mkdtemp(prefix="kinoe_sft_")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        pre, sft = os.path.join(root, "pre"), os.path.join(root, "sft")
        pre_rows = run_training(pre, ["train.total_steps = 6", "CheckpointConfig.save_every = 6"],
                                ["gin_configs/runs/tiny_ja.gin"])
        handler, root_log = _Messages(), logging.getLogger()
        old_level = root_log.level
        root_log.addHandler(handler)
        root_log.setLevel(logging.INFO)
        try:
            sft_rows = run_training(sft, SFT_BINDINGS + [f"load_params_from.checkpoint_dir = '{pre}/checkpoints'"],
                                    ["gin_configs/models/tiny_ja.gin"])
        finally:
            root_log.removeHandler(handler)
            root_log.setLevel(old_level)
        _RUNS.update(pre=pre, sft=sft, pre_rows=pre_rows, sft_rows=sft_rows, log=handler.lines)
    return _RUNS


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
    from kinoe_jax.inference import texts as generate

    reply = generate.main([f"--workdir={sft_runs()['sft']}", "--chat", "--system=短く答えます。",
                           "--prompt=猫の川柳をお願いします。", "--max_new_tokens=5"])
    assert isinstance(reply, str) and "<|" not in reply
    assert capsys.readouterr().out.strip() == reply.strip()
