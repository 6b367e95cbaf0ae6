"""What a checkpoint directory says about its model, read without touching the arrays.

Each step directory holds `model_config/metadata`, the ModelConfig as JSON (kinoe_jax/training/
checkpoint.py writes it); generation, evaluation, HF export and the training loop all read it here.
"""

from __future__ import annotations

import json

from etils import epath


def read_model_config(checkpoint_dir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, ModelConfig fields) of a checkpoint directory, without touching the arrays."""
    path = epath.Path(checkpoint_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps in {checkpoint_dir}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"step {step} not in {checkpoint_dir} (available: {steps})")
    cfg_file = path / str(step) / "model_config" / "metadata"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} missing: checkpoint {step} is incomplete or not from kinoe_jax")
    return step, json.loads(cfg_file.read_text())
