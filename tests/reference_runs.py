"""The tiny reference runs several test folders share, each made once per test session: a
pretraining run, an SFT run from its checkpoint (on the built-in senryu set), and a DPO run from
the SFT model."""

import atexit
import logging
import os
import shutil
import tempfile

import gin

from conftest import run_training
from paths import REPO

from kinoe_jax.config.gin_io import load_gin
from kinoe_jax.sft import tasks
from kinoe_jax.training import loop as train_lib
from kinoe_jax.training.metrics_writer import read_metrics

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


DPO_GIN = os.path.join(REPO, "gin_configs/runs/dpo_tiny_ja.gin")


def dpo_bindings(reference):
    """The tiny DPO run of these tests (also run as a subprocess by tests/e2e/test_dpo_runs.py)."""
    return [
        f"load_params_from.checkpoint_dir = '{reference}'",
        "DataConfig.seq_len = 128",  # keeps about half of the built-in pairs
        "train.model_overrides = {'max_seq_len': 128}",  # the SFT model was made for 64 tokens
        "train.total_steps = 12", "train.log_every = 1", "train.eval_every = 6", "train.downstream_eval_every = 0",
        "CheckpointConfig.save_every = 6", "CheckpointConfig.async_save = False",
        "cosine_schedule.peak_lr = 2e-3", "cosine_schedule.warmup_steps = 2",
        "MetricsWriter.use_wandb = False", "MetricsWriter.progress = False"]


def run_dpo(workdir, reference, bindings=()):
    gin.clear_config()
    load_gin([DPO_GIN], dpo_bindings(reference) + list(bindings))
    try:
        train_lib.train(str(workdir))
    finally:
        gin.clear_config()
    return read_metrics(str(workdir))


_REFERENCE: dict = {}


def dpo_reference():
    """One uninterrupted tiny DPO run from the SFT run, made once per session (the resume tests
    compare against it): {"dir", "rows", "sft"}."""
    if not _REFERENCE:
        sft = os.path.join(sft_runs()["sft"], "checkpoints")
        work = os.path.join(os.path.dirname(sft_runs()["sft"]), "dpo_reference")
        _REFERENCE.update(dir=work, rows=run_dpo(work, sft), sft=sft)
    return _REFERENCE
