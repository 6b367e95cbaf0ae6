"""Test setup: 8 simulated CPU devices, and a helper that runs a tiny training in-process."""

import os

# Must happen before jax is imported anywhere: a simulated 8-device mesh on the CPU.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
import pytest  # noqa: E402

from paths import REPO  # noqa: E402


# A model small enough that a step compiles and runs in about a second on 2 cores.
TEST_MODEL = [
    "ModelConfig.vocab_size = 4000",
    "ModelConfig.hidden_size = 64",
    "ModelConfig.intermediate_size = 128",
    "ModelConfig.num_layers = 2",
    "ModelConfig.num_heads = 4",
    "ModelConfig.num_kv_heads = 2",
    "ModelConfig.max_seq_len = 64",
    "train.model_config = @ModelConfig()",
    "train.data = @DataConfig()",
    "train.checkpointing = @CheckpointConfig()",
    "DataConfig.seq_len = 64",
    "DataConfig.global_batch = 8",
    "train.log_every = 1",
    "train.eval_every = 0",
    "train.downstream_eval_every = 0",
    "train.sample_prompt = ''",
    "MetricsWriter.use_wandb = False",
    "MetricsWriter.progress = False",
    "CheckpointConfig.async_save = False",
    "make_optimizer.schedule = @cosine_schedule",
    "cosine_schedule.peak_lr = 1e-3",
    "cosine_schedule.warmup_steps = 2",
]


def run_training(workdir, bindings=(), gin_files=(), base=True):
    """Run kinoe_jax.train in this process with a fresh gin config; returns metrics rows."""
    from kinoe_jax.training import loop as train_lib
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.training.metrics_writer import read_metrics

    gin.clear_config()
    load_gin([os.path.join(REPO, f) for f in gin_files], (TEST_MODEL if base else []) + list(bindings))
    try:
        train_lib.train(str(workdir))
    finally:
        gin.clear_config()
    return read_metrics(str(workdir))


@pytest.fixture
def train_run():
    return run_training


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
