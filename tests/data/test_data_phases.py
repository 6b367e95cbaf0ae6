"""The phase schedule: no SFT before the switch, SFT at its rate after it, exact resume around it."""

import json
import math
import shutil

import gin
import numpy as np
import pytest
from etils import epath

from conftest import run_training
from kinoe_jax.training import checkpoint as ckpt
from kinoe_jax.config import decay
from kinoe_jax.training import optim
from kinoe_jax.data import phases, pipeline, sources, pretraining as tasks
from kinoe_jax.data.vocab import get_vocabulary


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture
def phase_tasks(tmp_path):
    """A corpus of short documents and a chat set of short conversations: one example each."""
    _write(tmp_path / "docs.jsonl", [{"text": f"今日は{i}番目の文書を読みました。"} for i in range(300)])
    _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"質問{i}です。"},
                                                   {"role": "assistant", "content": f"答え{i}です。"}]}
                                     for i in range(100)])
    tasks.register_jsonl_task("test_docs", str(tmp_path / "docs.jsonl"))
    sources.register_chat_text_task("test_chat", str(tmp_path / "chat.jsonl"))
    tasks.register_mixture("test_docs_chat", {"test_docs": 0.75, "test_chat": 0.25})
    return pipeline.DataConfig(mixture="test_docs", seq_len=128, global_batch=8, shuffle_buffer=64)


def _segments(batch, assistant_id):
    """(all segments, segments holding an <|assistant|> token) of a packed batch."""
    total = sft = 0
    for tokens, seg in zip(np.asarray(batch["decoder_target_tokens"]), np.asarray(batch["decoder_segment_ids"])):
        for s in np.unique(seg[seg > 0]):
            total += 1
            sft += int(assistant_id in tokens[seg == s])
    return total, sft


def test_switch_step_follows_the_wsd_decay():
    gin.parse_config(["make_optimizer.schedule = @wsd_schedule", "wsd_schedule.decay_fraction = 0.25"])
    schedule = phases.PhaseSchedule(decay_mixture="m")
    assert schedule.switch_step(100) == decay.wsd_decay_start(100, 0.25) == 75
    lr = optim.wsd_schedule(total_steps=100, peak_lr=1.0, warmup_steps=5, decay_fraction=0.25)
    assert float(lr(74)) == 1.0 and float(lr(76)) < 1.0  # the SFT data arrives with the decay
    gin.clear_config()
    gin.parse_config(["make_optimizer.schedule = @wsd_schedule"])
    assert schedule.switch_step(100) == 90  # WSD's own default fraction
    gin.clear_config()
    assert schedule.switch_step(100) == 80  # no WSD: the last 20%
    assert phases.PhaseSchedule(decay_mixture="m", decay_fraction=0.3).switch_step(10) == 7
    with pytest.raises(ValueError, match="decay fraction"):
        phases.PhaseSchedule(decay_mixture="m", decay_fraction=1.5).switch_step(10)


def test_no_sft_before_the_switch_and_its_rate_after(phase_tasks):
    assistant = get_vocabulary().tokenizer.piece_to_id("<|assistant|>")
    schedule = phases.PhaseSchedule(decay_mixture="test_docs_chat", decay_fraction=0.5)
    it = phases.train_iterator(phase_tasks, total_steps=40, schedule=schedule)
    assert it.starts == (0, 20)
    before = [_segments(phases.next_batch(it, step), assistant) for step in range(20)]
    after = [_segments(phases.next_batch(it, step), assistant) for step in range(20, 40)]
    assert sum(t for t, _ in before) > 500 and sum(s for _, s in before) == 0
    n, k = sum(t for t, _ in after), sum(s for _, s in after)
    sigma = math.sqrt(0.25 * 0.75 / n)
    assert abs(k / n - 0.25) < 4 * sigma, f"SFT share {k / n:.3f} over {n} examples, configured 0.25"


def test_both_phase_iterators_are_checkpointed(phase_tasks, tmp_path):
    """Saved with the checkpoint's own handler just before (3) and just after (5) the switch at 4."""
    schedule = phases.PhaseSchedule(decay_mixture="test_docs_chat", decay_fraction=0.5)
    handler = ckpt.DataIteratorHandler()
    it = phases.train_iterator(phase_tasks, total_steps=8, schedule=schedule)
    expected = {}
    for step in range(8):
        if step in (3, 5):
            handler.save(epath.Path(tmp_path / f"iter_{step}"), ckpt.DataIteratorArgs(it))
        expected[step] = phases.next_batch(it, step)
    fresh = phases.train_iterator(phase_tasks, total_steps=8, schedule=schedule)
    for stop in (3, 5):
        handler.restore(epath.Path(tmp_path / f"iter_{stop}"), ckpt.DataIteratorArgs(fresh))
        for step in range(stop, 8):
            got = phases.next_batch(fresh, step)
            for key in pipeline.FEATURES:
                np.testing.assert_array_equal(got[key], expected[step][key], err_msg=f"resumed at {stop}, step {step}")


@pytest.mark.slow
def test_training_resumed_around_the_switch_is_exact(tmp_path):
    bindings = ["train.total_steps = 8", "PhaseSchedule.decay_fraction = 0.375",  # switch at step 5
                "CheckpointConfig.save_every = 2", "CheckpointConfig.keep = 10"]
    files = ["gin_configs/data/builtin_sft_decay.gin"]
    full = {r["step"]: r["loss"] for r in run_training(tmp_path / "full", bindings, files)}
    assert sorted(full) == list(range(1, 9))
    for stop in (4, 6):  # stopped one step before the switch, and one step after it
        work = tmp_path / f"stopped_at_{stop}"
        shutil.copytree(tmp_path / "full", work)
        for later in range(stop + 2, 9, 2):
            shutil.rmtree(work / "checkpoints" / str(later))
        resumed = {r["step"]: r["loss"] for r in run_training(work, bindings, files)}
        assert sorted(resumed) == list(range(1, 9))
        for step in range(stop + 1, 9):
            assert resumed[step] == full[step], f"resumed at {stop}: step {step} {resumed[step]} != {full[step]}"
