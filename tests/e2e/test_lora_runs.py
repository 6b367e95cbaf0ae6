"""LoRA in the training loop: SFT trains only the adapters and leaves the base bitwise as it was;
LoRA DPO after it references the merged SFT model through the same weights."""

import os

import numpy as np
import pytest
from flax import traverse_util

from conftest import run_training
from reference_runs import DPO_GIN, SFT_BINDINGS, dpo_bindings, sft_runs

from kinoe_jax.inference.loading import load_for_inference
from kinoe_jax.models.stored import read_model_config

pytestmark = pytest.mark.slow

LORA = ["train.lora = @LoraConfig()", "LoraConfig.rank = 8", "LoraConfig.alpha = 32.0",
        "LoraConfig.dropout = 0.05"]
_RUNS: dict = {}


def lora_sft():
    if not _RUNS:
        pre = sft_runs()["pre"]
        work = os.path.join(os.path.dirname(pre), "lora_sft")
        rows = run_training(work, SFT_BINDINGS + LORA + [f"load_params_from.checkpoint_dir = '{pre}/checkpoints'",
                                                         "train.model_config = None", "cosine_schedule.peak_lr = 3e-2"],
                            ["gin_configs/models/tiny_ja.gin"])
        _RUNS.update(dir=work, rows=rows)
    return _RUNS


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_lora_sft_trains_adapters_and_leaves_the_base_bitwise_unchanged():
    run = lora_sft()
    losses = [r["loss"] for r in run["rows"]]
    # The 6-step base is nearly untrained and its embeddings stay frozen: the adapters can move
    # the loss only so far (full SFT of the same base falls by > 0.5, mostly in the embeddings).
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0] - 0.1
    _, before = load_for_inference(os.path.join(sft_runs()["pre"], "checkpoints"))
    cfg, after = load_for_inference(os.path.join(run["dir"], "checkpoints"))
    assert cfg.lora is not None and cfg.lora.rank == 8
    before, after = _flat(before), _flat(after)
    adapters = {k for k in after if k.endswith(("lora_a", "lora_b"))}
    assert set(after) - adapters == set(before)
    for k, v in before.items():
        assert np.array_equal(after[k], v), f"{k} changed"
    assert all(np.any(after[k]) for k in adapters if k.endswith("lora_b"))  # B left zero: trained


def test_lora_state_has_optimizer_moments_only_for_the_adapters():
    import jax


    step, fields = read_model_config(os.path.join(lora_sft()["dir"], "checkpoints"))
    meta_dir = os.path.join(lora_sft()["dir"], "checkpoints", str(step), "state")
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(meta_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", getattr(meta, "item_metadata", meta))
    opt_paths = ["/".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(dict(tree)["opt_state"])[0]]
    moments = [p for p in opt_paths if p.endswith(("kernel", "embedding", "scale", "lora_a", "lora_b"))]
    assert moments and all(p.endswith(("lora_a", "lora_b")) for p in moments), moments[:5]


def test_lora_dpo_after_lora_sft_keeps_one_copy_and_raises_preference_accuracy(tmp_path):
    from kinoe_jax.training.objectives.dpo import DPO
    from kinoe_jax.training.objectives.base import RunInfo

    sft = os.path.join(lora_sft()["dir"], "checkpoints")
    rows = run_training(tmp_path / "dpo", dpo_bindings(sft) + LORA + [
        "LoraConfig.dropout = 0.0", "train.total_steps = 12", "cosine_schedule.peak_lr = 1e-2",
        # downstream scores work in this objective too, through the chat template (the gin file's)
        "train.downstream_eval_every = 12", "downstream_eval.max_samples = 2",
        "downstream_eval.datasets = ('kinoe_commonsense_mc',)"], [DPO_GIN], base=False)
    assert "downstream/kinoe_commonsense_mc/choice_accuracy" in rows[-1]
    evals = [r for r in rows if "eval_preference_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    # Step 0: the policy (merged SFT base + fresh adapters, B = 0) is the reference exactly.
    assert evals[0]["eval_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert evals[-1]["eval_preference_accuracy"] > evals[0]["eval_preference_accuracy"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # No second parameter tree: the reference is the base with the adapters off.
    cfg, _ = load_for_inference(str(tmp_path / "dpo"))
    run = RunInfo(workdir="", model_config=cfg, data=None, total_steps=1, eval_every=0, seed=0, mesh=None,
                  vocab=None, init_checkpoint=sft)
    assert DPO().frozen_inputs(run, None, None, restore_params=None) == (None, None)
