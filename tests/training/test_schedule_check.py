"""A resumed run says when its schedule is not the checkpoint's (the tiny run extended 300 -> 320)."""

import logging
import types

import gin

from kinoe_jax.config import decay
from kinoe_jax.training import optim
from kinoe_jax.training.schedule_check import changes, describe_schedule, warn_if_changed


def _tiny(total_steps):
    gin.parse_config([f"train.total_steps = {total_steps}", "wsd_schedule.decay_fraction = 0.2"],
                     skip_unknown=True)
    schedule = optim.wsd_schedule(total_steps, peak_lr=3e-3, warmup_steps=30, decay_fraction=0.2, final_lr=3e-5)
    switch = decay.wsd_decay_start(total_steps, 0.2)
    phases = types.SimpleNamespace(starts=(0, switch), names=("kinoe_ja_builtin", "kinoe_ja_builtin_decay"))
    return describe_schedule(schedule, total_steps, phases)


def test_extending_a_finished_wsd_run_names_every_change(caplog):
    saved = _tiny(300).at(300)
    gin.clear_config()
    now = _tiny(320)
    with caplog.at_level(logging.WARNING):
        found = warn_if_changed(saved, now, 300)
    assert "train.total_steps 300 -> 320" in found
    assert "data phase 1 (kinoe_ja_builtin_decay) starts at step 256 (was 240)" in found
    lr = [x for x in found if x.startswith("learning rate of step 301")]
    assert lr and lr[0].endswith(f"{saved['next_learning_rate']:.4g} before, {float(now.schedule(300)):.4g} now")
    assert float(now.schedule(300)) > 1.5 * saved["next_learning_rate"]  # the rate jumps back up
    assert len(caplog.records) == 1 and "resuming at step 300 under a changed schedule" in caplog.text


def test_extending_from_before_the_decay_keeps_the_rate():
    saved = _tiny(300).at(200)  # inside the stable phase
    found = changes(saved, _tiny(600), 200)
    assert "train.total_steps 300 -> 600" in found
    assert not any(x.startswith("learning rate") for x in found)


def test_an_unchanged_schedule_and_old_checkpoints_say_nothing(caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_if_changed(_tiny(300).at(100), _tiny(300), 100) == []
        assert warn_if_changed(None, _tiny(300), 100) == []
    assert not caplog.records
