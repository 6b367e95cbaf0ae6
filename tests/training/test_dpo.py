"""DPO: preference rows carry the reply mask, the loss is the DPO formula, batches follow from the
step alone, and a tiny run on the built-in pairs raises preference accuracy over the SFT model."""

import json
import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from reference_runs import dpo_reference, run_dpo

from kinoe_jax.training.objectives import dpo as dpo_lib
from kinoe_jax.data.vocab import BOS_ID, get_vocabulary
from kinoe_jax.data.chat.conversation import encode, end_id
from kinoe_jax.data.chat.preference import load_pairs


def test_builtin_pairs_load_with_the_reply_as_the_only_trained_tokens():
    vocab = get_vocabulary()
    data = load_pairs(dpo_lib.BUILTIN_PREFERENCES, 384, vocab)
    assert len(data) == 60 and not data.report.problems
    with open(dpo_lib.BUILTIN_PREFERENCES, encoding="utf-8") as f:
        first = json.loads(f.readline())
    for side in ("chosen", "rejected"):
        rows = getattr(data, side)
        messages = first["prompt"] + [{"role": "assistant", "content": first[side]}]
        ids, _ = encode(messages, vocab)
        n = len(ids)
        assert list(rows["targets"][0][:n]) == ids and not rows["targets"][0][n:].any()
        assert rows["inputs"][0][0] == BOS_ID and list(rows["inputs"][0][1:n]) == ids[:-1]
        trained = rows["targets"][0][rows["weights"][0] == 1]
        assert list(trained) == list(vocab.encode(first[side])) + [end_id(vocab)]


def test_bad_pairs_are_reported_by_file_and_line(tmp_path):
    good = {"prompt": [{"role": "user", "content": "川柳を一句。"}], "chosen": "a", "rejected": "b"}
    lines = [good,
             {**good, "rejected": "a"},                               # 2 identical replies
             {**good, "prompt": [{"role": "assistant", "content": "x"}]},  # 3 prompt must end with user
             {"chosen": "a", "rejected": "b"},                         # 4 no prompt
             {**good, "chosen": None}]                                 # 5 no chosen
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{oops\n", encoding="utf-8")
    data = load_pairs(str(path), 64, get_vocabulary())
    assert len(data) == 1 and data.sources == [(str(path), 1)]
    got = {(p.line, p.reason) for p in data.report.problems}
    assert got == {(2, "bad_pair"), (3, "role_order"), (4, "missing_messages"), (5, "bad_pair"),
                   (6, "malformed_json")}


def test_dpo_terms_match_the_formula():
    pc, pr, rc, rr = (jnp.array([-5.0, -9.0]), jnp.array([-7.0, -4.0]),
                      jnp.array([-6.0, -6.0]), jnp.array([-6.0, -6.0]))
    t = dpo_lib.dpo_terms(pc, pr, rc, rr, beta=0.5, label_smoothing=0.0)
    margin = 0.5 * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(t["reward_margin"], margin)
    np.testing.assert_allclose(t["loss"], np.log1p(np.exp(-np.asarray(margin))), rtol=1e-6)
    assert list(t["preference_accuracy"]) == [1.0, 0.0]
    same = dpo_lib.dpo_terms(pc, pr, pc, pr, beta=0.1, label_smoothing=0.0)  # policy == reference
    np.testing.assert_allclose(same["loss"], [math.log(2)] * 2, rtol=1e-6)


def test_step_batches_cover_each_epoch_once_and_are_reproducible():
    n, b = 10, 4
    stream = np.concatenate([dpo_lib.step_indices(s, b, n, seed=3) for s in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    np.testing.assert_array_equal(dpo_lib.step_indices(3, b, n, seed=3), stream[12:16])
    assert not np.array_equal(dpo_lib.step_indices(0, b, n, seed=4), stream[:4])


@pytest.mark.slow
def test_tiny_dpo_run_raises_preference_accuracy_and_resumes(tmp_path):
    run = dpo_reference()
    reference, rows = run["sft"], run["rows"]
    evals = [r for r in rows if "eval_preference_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    start, end = evals[0], evals[-1]
    # At step 0 the policy is the reference: every reward is 0 and the loss is log 2.
    assert start["eval_reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert start["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert end["eval_preference_accuracy"] >= 0.8 > start["eval_preference_accuracy"]
    assert end["eval_reward_margin"] > evals[1]["eval_reward_margin"] > 0
    assert end["eval_loss"] < math.log(2) - 0.1
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(k in steps[0] for k in ("reward_margin", "preference_accuracy", "grad_norm", "learning_rate"))
    assert sorted(os.listdir(os.path.join(run["dir"], "checkpoints"))) == ["12", "6"]
    assert os.path.exists(os.path.join(run["dir"], "tokenizer.model"))
    assert os.path.exists(os.path.join(run["dir"], "config.gin"))

    # Same command, more steps (on a copy: the reference run stays as it was): it resumes from
    # step 12 instead of starting over.
    work = tmp_path / "dpo"
    shutil.copytree(run["dir"], work)
    more = run_dpo(work, reference, ["train.total_steps = 14"])
    assert [r["step"] for r in more if "loss" in r] == list(range(1, 15))
    assert [r["step"] for r in more if "eval_loss" in r] == [0, 6, 12, 14]
