"""The spike machinery one piece at a time: per-group statistics inside the step, the detector,
the skip plan and the cursor past skipped batches, and the rollback decision. The whole runs
(a poisoned tiny_ja run that rolls back, a clean one that does not) are in
tests/e2e/test_spike_runs.py."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.training.resilience import Faults
from kinoe_jax.training.resilience.data_skip import SKIPPED_FILE, DataCursor, SkipPlan
from kinoe_jax.training.resilience.param_stats import group_of, second_moments, step_stats
from kinoe_jax.training.resilience.spike_guard import SpikeGuard
from kinoe_jax.training.resilience.spikes import SpikeDetector
from kinoe_jax.training.step import make_train_step


# ----------------------------------------------------------------------------- per-group statistics
def _path(*names):
    return tuple(jax.tree_util.DictKey(n) for n in names)


def test_parameters_fall_into_their_layer_stack_groups():
    assert group_of(_path("layers", "layer", "attn", "q_proj", "kernel")) == "attention"
    assert group_of(_path("layers", "layer", "attn_norm", "scale")) == "norms"
    assert group_of(_path("layers", "layer", "mlp", "up_proj", "kernel")) == "mlp"
    assert group_of(_path("layers", "layer", "moe", "wi_gate")) == "experts"
    assert group_of(_path("embed", "embedding")) == "embeddings"
    assert group_of(_path("lm_head", "kernel")) == "head"
    assert group_of(_path("final_norm", "scale")) == "norms"


def test_step_stats_are_the_norms_of_each_group():
    old = {"attn": {"w": jnp.ones((3, 2))}, "mlp": {"w": jnp.full((4,), 2.0)}}
    new = {"attn": {"w": jnp.full((3, 2), 1.5)}, "mlp": {"w": jnp.full((4,), 2.0)}}
    grads = {"attn": {"w": jnp.full((3, 2), 0.5)}, "mlp": {"w": jnp.ones((4,))}}
    tx = optax.adam(1e-3)
    opt_state = tx.update(grads, tx.init(old), old)[1]
    s = jax.jit(step_stats)(old, new, grads, opt_state)
    np.testing.assert_allclose(s["stats/attention/grad_norm"], np.sqrt(6 * 0.25), rtol=1e-6)
    np.testing.assert_allclose(s["stats/attention/update_norm"], np.sqrt(6 * 0.25), rtol=1e-6)
    np.testing.assert_allclose(s["stats/attention/param_norm"], np.sqrt(6 * 2.25), rtol=1e-6)
    np.testing.assert_allclose(s["stats/attention/update_ratio"], 0.5 / 1.5, rtol=1e-6)
    assert float(s["stats/mlp/update_norm"]) == 0.0
    # Adam's nu after one step is (1 - b2) g^2.
    np.testing.assert_allclose(s["stats/mlp/adam_nu_mean"], 0.001, rtol=1e-5)
    np.testing.assert_allclose(s["stats/attention/adam_nu_max"], 0.001 * 0.25, rtol=1e-5)
    np.testing.assert_allclose(s["update_ratio"], np.sqrt(6 * 0.25 / (6 * 2.25 + 4 * 4)), rtol=1e-6)


def test_second_moments_are_found_inside_the_projects_optimizer_chain():
    from kinoe_jax.training.optim import make_optimizer

    tx, _ = make_optimizer(10)
    params = {"embed": {"embedding": jnp.ones((2, 2))}, "lm_head": {"kernel": jnp.ones((2, 2))}}
    nu = second_moments(tx.init(params))
    assert nu is not None and jax.tree.structure(nu) == jax.tree.structure(params)


@pytest.fixture(scope="module")
def tiny_step():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, max_seq_len=16)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
    tx = optax.adamw(1e-2)
    state = {"step": jnp.int32(3), "params": params, "opt_state": tx.init(params), "rng": jnp.zeros(2, jnp.uint32)}
    tokens = np.random.default_rng(0).integers(1, 64, (1, 2, 17)).astype(np.int32)
    batch = {"decoder_input_tokens": tokens[..., :-1], "decoder_target_tokens": tokens[..., 1:],
             "decoder_loss_weights": np.ones((1, 2, 16), np.float32),
             "decoder_segment_ids": np.ones((1, 2, 16), np.int32),
             "decoder_positions": np.broadcast_to(np.arange(16), (1, 2, 16)).astype(np.int32)}
    return jax.jit(make_train_step(model, tx, lambda s: 1e-2, group_stats=True)), state, batch


def test_the_step_reports_every_group_and_lr_scale_shrinks_the_update(tiny_step):
    step, state, batch = tiny_step
    _, full = step(state, batch, np.float32(np.inf), None, np.float32(1.0))
    _, half = step(state, batch, np.float32(np.inf), None, np.float32(0.5))
    for group in ("attention", "mlp", "norms", "embeddings", "head"):
        for stat in ("grad_norm", "update_norm", "param_norm", "update_ratio", "adam_nu_mean", "adam_nu_max"):
            assert np.isfinite(float(full[f"stats/{group}/{stat}"])), (group, stat)
    np.testing.assert_allclose(float(half["update_norm"]) / float(full["update_norm"]), 0.5, rtol=1e-4)
    np.testing.assert_allclose(float(half["learning_rate"]), 0.5e-2, rtol=1e-6)
    # A skipped step (loss above the ceiling) applies no update.
    _, skipped = step(state, batch, np.float32(0.0), None, np.float32(1.0))
    assert float(skipped["update_skipped"]) == 1.0 and float(skipped["update_norm"]) == 0.0


# ----------------------------------------------------------------------------- the detector
def _feed(detector, losses, ratio=1e-3, lr=1e-3, start=1):
    found = []
    for i, loss in enumerate(losses, start):
        spike = detector.observe(i, float(loss), ratio, lr)
        if spike:
            found.append(spike)
    return found


def test_a_noisy_falling_loss_is_not_a_spike():
    rng = np.random.default_rng(0)
    losses = 6.0 * np.exp(-np.arange(500) / 150) + 2.0 + rng.normal(0, 0.05, 500)
    assert _feed(SpikeDetector(), losses) == []


def test_one_odd_batch_is_not_confirmed_but_a_lasting_rise_is():
    rng = np.random.default_rng(1)
    base = 3.0 + rng.normal(0, 0.03, 200)
    one = base.copy()
    one[120] += 2.0
    assert _feed(SpikeDetector(), one) == []
    lasting = base.copy()
    lasting[150:] += 0.8  # recovers only partway: stays 0.8 above
    spikes = _feed(SpikeDetector(), lasting)
    assert spikes and spikes[0].onset == 151 and spikes[0].step == 153
    assert spikes[0].z > 5 and "anomalous since step 151" in spikes[0].describe()


def test_an_update_ratio_blowup_alone_is_confirmed():
    d = SpikeDetector()
    for i in range(1, 60):
        assert d.observe(i, 3.0 + 0.01 * (i % 3), 1e-3, 1e-3) is None
    found = [d.observe(i, 3.0, 1e-2, 1e-3) for i in range(60, 63)]
    assert found[-1] is not None and found[-1].ratio_factor == pytest.approx(10.0, rel=1e-6)
    # The same ratio with a learning rate ten times larger is ordinary.
    d.reset()
    for i in range(1, 60):
        d.observe(i, 3.0, 1e-3, 1e-3)
    assert all(d.observe(i, 3.0, 1e-2, 1e-2) is None for i in range(60, 70))


@pytest.mark.parametrize("bad", ["loss_sigma = 0", "ratio_factor = 1", "min_history = 1", "confirm_steps = 0"])
def test_detector_settings_are_checked(bad):
    key, value = bad.split(" = ")
    with pytest.raises(ValueError, match=f"SpikeDetector.{key}"):
        SpikeDetector(**{key: float(value) if "." in value else int(value)})


# ----------------------------------------------------------------------------- the skip plan and the cursor
def test_position_at_counts_the_skipped_batches_drawn_before_a_step():
    plan = SkipPlan()
    assert plan.position_at(5) == 5
    assert plan.skip(4, 6, {4: 4, 5: 5, 6: 6}) == [4, 5, 6]
    assert plan.skip(5, 7, {}) == [7]
    assert plan.skipped == [4, 5, 6, 7]
    assert plan.position_at(3) == 3 and plan.position_at(4) == 8 and plan.position_at(10) == 14
    plan.lr_windows.append([10, 19, 0.5])
    assert plan.lr_scale(9) == 1.0 and plan.lr_scale(10) == 0.5 and plan.lr_scale(19) == 0.5


def test_the_plan_reads_back_and_a_damaged_one_is_named(tmp_path):
    plan = SkipPlan([3, 4], [[2, 5, 0.5]], [{"batches": [3, 4]}], {3: 3})
    plan.save(str(tmp_path))
    assert SkipPlan.load(str(tmp_path)) == plan
    (tmp_path / "spike_rollbacks.json").write_text("{not json")
    with pytest.raises(ValueError, match="spike_rollbacks.json is unreadable"):
        SkipPlan.load(str(tmp_path))


class _Stream:
    """A data stream whose n-th batch (1-based) carries n."""

    def __init__(self):
        self.drawn = 0

    def next(self, step):
        self.drawn += 1
        return {"decoder_target_tokens": np.full((2, 4), self.drawn, np.int32)}


def test_the_cursor_moves_past_skipped_batches_and_records_each_once(tmp_path):
    plan = SkipPlan()
    plan.skip(3, 4, {3: 3, 4: 4})
    plan.rollbacks.append({"batches": [3, 4]})
    cursor = DataCursor(str(tmp_path), plan, Faults(), primary=True)
    stream = _Stream()
    got = [int(cursor.next(s, stream)["decoder_target_tokens"][0, 0]) for s in range(4)]
    assert got == [1, 2, 5, 6]
    rows = [json.loads(line) for line in (tmp_path / SKIPPED_FILE).read_text().splitlines()]
    assert [(r["batch"], r["skipped_before_step"], r["trained_at_step"], r["rollback"]) for r in rows] == \
        [(3, 3, 3, 1), (4, 3, 4, 1)]
    assert len({r["fingerprint"] for r in rows}) == 2
    # A resumed run (a new cursor after step 1, iterator restored there) draws the same batches and
    # does not record the skips twice.
    resumed = DataCursor(str(tmp_path), plan, Faults(), primary=True)
    resumed.start(1)
    stream = _Stream()
    stream.drawn = 1
    assert [int(resumed.next(s, stream)["decoder_target_tokens"][0, 0]) for s in range(1, 4)] == [2, 5, 6]
    assert len((tmp_path / SKIPPED_FILE).read_text().splitlines()) == 2


def test_poisoned_batches_get_random_targets_where_there_are_targets():
    faults = Faults(poison_batches_from=2, poison_batches_count=1)
    targets = np.arange(1, 33, dtype=np.int32).reshape(4, 8)
    targets[:, -2:] = 0  # padding stays padding
    batch = {"decoder_target_tokens": targets}
    assert faults.poison_batch(batch, 1) is batch
    poisoned = faults.poison_batch(batch, 2)["decoder_target_tokens"]
    assert (poisoned[:, -2:] == 0).all() and poisoned[:, :-2].min() >= 1 and poisoned.max() <= 30
    assert not np.array_equal(poisoned, targets)
    assert np.array_equal(poisoned, faults.poison_batch(batch, 2)["decoder_target_tokens"])  # deterministic


# ----------------------------------------------------------------------------- the rollback decision
class _Manager:
    def __init__(self, steps):
        self.steps = list(steps)

    def all_steps(self):
        return list(self.steps)

    def delete(self, step):
        self.steps.remove(step)

    def wait_until_finished(self):
        pass


class _Alerts:
    def __init__(self):
        self.sent = []

    def send(self, kind, title, text, level="WARN", step=None):
        self.sent.append((kind, title, text, level))


def _confirm(guard, first_step, drawn):
    """Healthy steps up to `first_step` - 1, then a lasting rise until confirmed."""
    guard.start(0)
    for s in range(1, drawn + 1):
        guard.drawn = s
        guard.observe(s, 3.0 + 0.01 * (s % 2) if s < first_step else 6.0, 1e-3, 1e-3, False)


def test_a_confirmed_spike_rolls_back_before_its_onset_and_plans_the_skip(tmp_path):
    import gin

    gin.bind_parameter("SpikeRollback.lr_factor", 0.5)
    gin.bind_parameter("SpikeRollback.lr_steps", 20)
    manager, alerts = _Manager([20, 40, 60]), _Alerts()
    guard = SpikeGuard(str(tmp_path), manager, alerts, Faults(), primary=True)
    _confirm(guard, 51, 54)
    assert guard.rollback_target() == 40
    assert manager.steps == [20, 40]  # the checkpoint taken during the spike is gone
    plan = SkipPlan.load(str(tmp_path))
    assert plan.skipped == list(range(41, 55))  # from the checkpoint (onset 51 - 10 < 41) to the last drawn
    assert plan.lr_windows == [[40, 59, 0.5]] and guard.lr_scale(45) == np.float32(0.5)
    kind, _, text, _ = alerts.sent[-1]
    assert kind == "rollback" and "step 53" in text and "checkpoint step 40" in text and "batches 41-54" in text
    assert "x0.5 for steps 41-60" in text


def test_past_the_rollback_limit_the_run_halts_with_a_verdict(tmp_path):
    import gin

    gin.bind_parameter("SpikeRollback.max_rollbacks", 0)
    guard = SpikeGuard(str(tmp_path), _Manager([20]), _Alerts(), Faults(), primary=True)
    _confirm(guard, 51, 54)
    assert guard.rollback_target() is None
    assert "SpikeRollback.max_rollbacks = 0" in guard.verdict and "\n" not in guard.verdict
    assert not os.path.exists(tmp_path / "spike_rollbacks.json")


def test_the_loss_plot_gains_the_update_norm_panel(tmp_path):
    from kinoe_jax.training.metrics_writer import plot_loss

    rows = [{"step": s, "loss": 5.0 - 0.01 * s, "update_norm": 0.1, "stats/mlp/update_norm": 0.05} for s in range(1, 30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rolled_back_metrics.jsonl").write_text(json.dumps({"step": 25, "loss": 9.0, "rollback": 1}) + "\n")
    path = plot_loss(str(tmp_path))
    from PIL import Image

    with Image.open(path) as image:  # three panels would be wider still; one panel is about 7 inches
        assert image.size[0] > 1.6 * image.size[1]
