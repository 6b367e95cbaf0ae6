"""Resilience pieces one at a time, in this process: the in-step skip, spike detection, alerts
(rate limits, an injected sink, a localhost webhook, W&B offline), validation, disk estimates,
the watchdog and the SIGTERM handler. The end-to-end fault injection lives in
test_resilience_runs.py."""

import http.server
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import run_training
from wandb_log import wandb_alerts
from kinoe_jax.utils.errors import ConfigError
from kinoe_jax.training.resilience import Faults, StepGuard, skip_bad_update
from kinoe_jax.training.resilience.alerts import Alerter
from kinoe_jax.training.resilience.diskspace import DiskGuard, state_bytes
from kinoe_jax.training.resilience.preemption import PreemptionGuard
from kinoe_jax.data.batch_checks import check_batch
from kinoe_jax.training.resilience.run_checks import find_secrets, validate_run
from kinoe_jax.utils.errors import DataError
from kinoe_jax.training.resilience.watchdog import Watchdog


# ----------------------------------------------------------------------------- the in-step skip
def _toy():
    tx = optax.adamw(0.1)
    params = {"w": jnp.arange(4.0), "b": jnp.ones((2, 2))}
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params), "rng": jnp.zeros(2, jnp.uint32)}

    @jax.jit
    def step(state, x, ceiling, poison):
        def loss_fn(p):
            return jnp.mean((p["w"] * x - 1.0) ** 2) + jnp.sum(p["b"] ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)

        def update():
            updates, opt = tx.update(grads, state["opt_state"], state["params"])
            return optax.apply_updates(state["params"], updates), opt

        return skip_bad_update(state, update, {"loss": loss, "grad_norm": optax.global_norm(grads)}, ceiling)

    return state, step


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=False)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nan_gradients_leave_params_and_optimizer_state_untouched():
    state, step = _toy()
    before = jax.device_get(state)
    bad, m = step(state, 2.0, np.float32(np.inf), True)
    assert _same(bad["params"], before["params"]) and _same(bad["opt_state"], before["opt_state"])
    assert int(bad["step"]) == 1  # the batch was consumed
    assert float(m["update_skipped"]) == 1.0 and float(m["nonfinite"]) == 1.0

    good, m = step(bad, 2.0, np.float32(np.inf), False)
    assert not _same(good["params"], before["params"])
    assert float(m["update_skipped"]) == 0.0 and float(m["nonfinite"]) == 0.0
    # The skipped step did not count for Adam: the first applied update equals a fresh one.
    fresh, _ = step(jax.device_get(state), 2.0, np.float32(np.inf), False)
    assert _same(good["params"], fresh["params"]) and _same(good["opt_state"], fresh["opt_state"])


def test_loss_above_the_ceiling_is_skipped_but_finite():
    state, step = _toy()
    new, m = step(state, 2.0, np.float32(0.5), False)  # the loss here is about 4.7
    assert _same(new["params"], state["params"])
    assert float(m["update_skipped"]) == 1.0 and float(m["nonfinite"]) == 0.0


def test_fault_hook_poisons_exactly_one_step():
    grads = {"a": jnp.ones(3)}
    hook = Faults(nan_grad_at_step=3)
    assert np.isnan(hook.poison_grads(grads, jnp.int32(2))["a"]).all()
    assert np.array_equal(hook.poison_grads(grads, jnp.int32(3))["a"], np.ones(3))
    assert Faults().poison_grads(grads, jnp.int32(2)) is grads  # off: not even traced


# ----------------------------------------------------------------------------- spikes and halting
def test_spike_detected_logged_and_optionally_skipped():
    rng = np.random.default_rng(0)
    guard = StepGuard(spike_sigma=5.0, spike_window=50, spike_min_history=20)
    for step in range(1, 20):
        assert guard.observe(step, 2.0 + 0.01 * rng.standard_normal(), False, False) == []
        assert guard.threshold() is None  # too little history for a verdict
    guard.observe(20, 2.0, False, False)
    t = guard.threshold()
    assert t is not None and 2.0 < t < 2.2
    assert guard.loss_ceiling() == np.float32(np.inf)  # only logged by default
    events = guard.observe(21, 3.0, False, False)
    assert [e.kind for e in events] == ["spike"] and "step 21" in events[0].message
    assert guard.counters() == {"skipped_steps": 0, "nonfinite_steps": 0, "loss_spikes": 1}

    skipping = StepGuard(spike_sigma=5.0, spike_window=50, spike_min_history=20, skip_spikes=True)
    for step in range(1, 21):
        skipping.observe(step, 2.0 + 0.01 * rng.standard_normal(), False, False)
    ceiling = skipping.loss_ceiling()
    assert np.isfinite(ceiling) and ceiling == np.float32(skipping.threshold())
    n = len(skipping.window)
    events = skipping.observe(21, 3.0, False, True)  # the step skipped it
    assert "update skipped" in events[0].message
    assert len(skipping.window) == n  # a skipped spike does not raise the bar


def test_consecutive_bad_steps_halt_with_the_last_good_step():
    guard = StepGuard(max_consecutive_skips=3)
    guard.observe(1, 2.0, False, False)
    guard.observe(2, float("nan"), True, True)
    guard.observe(3, 2.0, False, False)  # a good step resets the streak
    for step in (4, 5):
        guard.observe(step, float("nan"), True, True)
        assert not guard.should_halt()
    guard.observe(6, float("inf"), True, True)
    assert guard.should_halt()
    msg = guard.halt_message()
    assert "3 consecutive" in msg and "after step 3" in msg and "non-finite" in msg
    assert guard.counters()["nonfinite_steps"] == 4


def test_guard_settings_are_validated():
    with pytest.raises(ValueError, match="StepGuard.max_consecutive_skips"):
        StepGuard(max_consecutive_skips=0)
    with pytest.raises(ValueError, match="spike_min_history"):
        StepGuard(spike_window=10, spike_min_history=20)


# ----------------------------------------------------------------------------- alerts
def test_alerts_are_rate_limited_per_kind_and_reach_an_injected_sink(tmp_path):
    got = []
    now = [0.0]
    alerts = Alerter(log_file=str(tmp_path / "alerts.jsonl"), min_interval_s=60, sinks=[lambda *a: got.append(a)],
                     clock=lambda: now[0], webhook_env="")
    assert alerts.send("nonfinite", "step skipped", "step 3", "WARN")
    assert not alerts.send("nonfinite", "step skipped", "step 4", "WARN")
    assert not alerts.send("nonfinite", "step skipped", "step 5", "WARN")
    assert alerts.send("finished", "run finished", "done", "INFO")  # another kind is not held back
    now[0] = 61.0
    assert alerts.send("nonfinite", "step skipped", "step 9", "WARN")
    assert alerts.flush(5)
    assert [a[0] for a in got] == ["step skipped", "run finished", "step skipped"]
    assert "2 more 'nonfinite' alerts suppressed" in got[-1][1]
    rows = [json.loads(line) for line in open(tmp_path / "alerts.jsonl")]
    assert [r["suppressed"] for r in rows] == [False, True, True, False, False]
    with pytest.raises(ValueError, match="level"):
        alerts.send("x", "t", "x", "LOUD")


def test_a_failing_sink_does_not_stop_the_others():
    got = []

    def broken(*a):
        raise ConnectionError("no route")

    alerts = Alerter(sinks=[broken, lambda *a: got.append(a)], webhook_env="")
    alerts.attach_wandb(None)  # W&B off: nothing attached
    alerts.send("halt", "halted", "why", "ERROR")
    assert alerts.flush(5) and got == [("halted", "why", "ERROR")]


def test_webhook_url_comes_from_the_environment(monkeypatch):
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KINOE_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
        alerts = Alerter(run_name="r1")
        alerts.send("watchdog", "run stalled", "no step for 600 s", "ERROR")
        assert alerts.flush(10)
    finally:
        server.shutdown()
    assert len(received) == 1 and "r1: run stalled" in received[0]["text"] and "ERROR" in received[0]["text"]


def test_alerts_go_through_wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment outranks wandb.init's argument
    alerts = Alerter(webhook_env="")
    alerts.send("checkpoint", "checkpoint damaged", "fell back to step 4", "WARN")  # before W&B exists
    run = wandb.init(project="kinoe_test", dir=str(tmp_path), mode="offline", id="alerttest1")
    try:
        alerts.attach_wandb(run)
        alerts.send("halt", "run halted", "too many bad steps", "ERROR")
        assert alerts.flush(10)
    finally:
        run.finish()
        wandb.teardown()  # stop this process's W&B service (and stop lending it to subprocesses)
    deadline = time.monotonic() + 20  # W&B's service may still be flushing its log
    while len(got := wandb_alerts(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ("checkpoint damaged", "fell back to step 4", "WARN") in got
    assert ("run halted", "too many bad steps", "ERROR") in got


# ----------------------------------------------------------------------------- validation
def test_config_problems_are_all_named_by_their_gin_binding():
    from kinoe_jax.training.checkpoint import CheckpointConfig
    from kinoe_jax.data.pipeline import DataConfig
    from kinoe_jax.models import ModelConfig

    model = ModelConfig(max_seq_len=64)
    with pytest.raises(ConfigError) as e:
        validate_run(model, DataConfig(seq_len=128, global_batch=6, grad_accum=4), CheckpointConfig(save_every=0),
                     total_steps=0, log_every=1, eval_every=0,
                     config_str="MetricsWriter.run_name = 'https://hooks.slack.com/services/T0/B0/abc'")
    msg = str(e.value)
    for needle in ("train.total_steps = 0", "DataConfig.seq_len = 128 exceeds ModelConfig.max_seq_len = 64",
                   "DataConfig.global_batch = 6 is not divisible by DataConfig.grad_accum = 4",
                   "CheckpointConfig.save_every = 0", "MetricsWriter.run_name", "environment"):
        assert needle in msg
    validate_run(model, DataConfig(seq_len=64), CheckpointConfig(), total_steps=10, log_every=1, eval_every=0)


def test_secret_looking_bindings_are_found():
    cfg = "\n".join(["train.sample_tokens = 40", "Alerter.webhook_env = 'KINOE_ALERT_WEBHOOK'",
                     "Hub.hf_token = 'abc'", "Foo.api_key = 'abc'", "Foo.webhook = None",
                     "Foo.note = 'x' # not a secret", "Foo.key = '0123456789abcdef0123456789abcdef01234567'"])
    assert find_secrets(cfg) == ["Hub.hf_token", "Foo.api_key", "Foo.key"]


def _batch(b=2, t=8, vocab=100):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (b, t), dtype=np.int32)
    return {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
            "decoder_loss_weights": np.ones((b, t), np.int32), "decoder_segment_ids": np.ones((b, t), np.int32),
            "decoder_positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


def test_first_batch_check_names_the_problem():
    check_batch(_batch(), vocab_size=100, batch_size=2, seq_len=8, max_seq_len=8)
    bad = _batch()
    bad["decoder_target_tokens"] = bad["decoder_target_tokens"].copy()
    bad["decoder_target_tokens"][1, 5] = 100
    with pytest.raises(DataError, match=r"decoder_target_tokens\[1, 5\] = 100 is outside the vocabulary \[0, 100\)"):
        check_batch(bad, vocab_size=100, batch_size=2, seq_len=8)
    with pytest.raises(DataError, match=r"shape \(2, 8\), expected \(local batch 4, DataConfig.seq_len 8\)"):
        check_batch(_batch(), vocab_size=100, batch_size=4, seq_len=8)
    empty = dict(_batch(), decoder_loss_weights=np.zeros((2, 8), np.int32))
    with pytest.raises(DataError, match="all zero"):
        check_batch(empty, vocab_size=100, batch_size=2, seq_len=8)
    with pytest.raises(DataError, match="missing features"):
        check_batch({"decoder_input_tokens": _batch()["decoder_input_tokens"]}, vocab_size=100, batch_size=2, seq_len=8)


def test_training_refuses_a_bad_config_before_any_work(tmp_path):
    t = time.monotonic()
    with pytest.raises(ConfigError, match="DataConfig.seq_len = 128 exceeds ModelConfig.max_seq_len = 64"):
        run_training(tmp_path / "a", ["DataConfig.seq_len = 128"])
    with pytest.raises(ConfigError, match="environment"):
        run_training(tmp_path / "b", ["MetricsWriter.wandb_project = 'https://hooks.slack.com/services/T/B/x'"])
    assert time.monotonic() - t < 15
    assert not (tmp_path / "a").exists()  # failed before creating anything


# ----------------------------------------------------------------------------- disk space
def test_disk_estimate_follows_the_last_checkpoint(tmp_path):
    step = tmp_path / "ckpt" / "4" / "state"
    step.mkdir(parents=True)
    (step / "data").write_bytes(b"x" * 10_000)
    guard = DiskGuard(str(tmp_path / "ckpt"), margin=1.5, simulate_capacity_bytes=30_000)
    state = {"w": jnp.zeros((100, 10), jnp.float32)}
    assert state_bytes(state) == 4000
    assert guard.needed_bytes(state, None) == 6000  # no checkpoint yet: the state's bytes
    assert guard.needed_bytes(state, 4) == 15_000
    assert guard.needed_bytes(state, 4, in_flight=True) == 30_000
    assert guard.free_bytes() == 20_000
    assert guard.check(state, 4) == (True, 15_000, 20_000)
    (step / "more").write_bytes(b"x" * 3_000)  # now 13 kB: needs 19.5 kB, 17 kB free
    assert guard.check(state, 4) == (False, 19_500, 17_000)
    assert DiskGuard("gs://bucket/run/checkpoints").check(state, 4)[0]  # unmeasurable: never blocks


# ----------------------------------------------------------------------------- watchdog, signals
def test_watchdog_fires_only_after_a_silence():
    fired = []
    dog = Watchdog(0.3, fired.append, backstop_s=None)
    dog.start()
    try:
        time.sleep(0.6)
        assert fired == []  # not armed before the first completed step (compilation)
        for _ in range(10):
            dog.beat()
            time.sleep(0.05)
        assert fired == []
        time.sleep(0.8)
        assert len(fired) == 1 and fired[0] > 0.3
    finally:
        dog.stop()


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    guard = PreemptionGuard()
    guard.install()
    try:
        assert not guard.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert guard.requested(2) and guard.signal_name == "SIGTERM"
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
