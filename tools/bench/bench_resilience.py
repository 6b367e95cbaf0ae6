"""What the resilience guard costs per training step.

"plain": the jitted step without the non-finite/spike skip, and a bare host loop.
"guarded": the step as kinoe_jax.train builds it (the optimizer update under lax.cond on a
finiteness flag, the loss ceiling as an argument) and the host calls of the training loop
(RunGuard.before_step / after_step / should_stop with Orbax's preemption check, the watchdog).

Both run in alternating rounds inside ONE process, so machine noise hits both alike; the ratio
is the result.

    python tools/bench/bench_resilience.py [--rounds 5] [--steps 10] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.bench import _smoke as smoke  # noqa: E402

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # a CPU machine with the chip compilers installed stays on the CPU, quietly

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, KV, FFN, SEQ, BATCH = 8000, 256, 4, 4, 2, 704, 256, 8
# --smoke: the same steps and guard on a model that compiles and runs in seconds.
SMOKE_SHAPE = dict(VOCAB=512, HIDDEN=64, LAYERS=2, HEADS=4, KV=2, FFN=128, SEQ=64, BATCH=2)
RESULT_LINE = r"^guarded / plain = [0-9.]+$"


def build(guarded: bool):
    import flax.linen as nn
    import optax

    from kinoe_jax.training import step as step_lib
    from kinoe_jax.models import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS,
                      num_heads=HEADS, num_kv_heads=KV, max_seq_len=SEQ)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))["params"])
    tx = optax.adamw(1e-4)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jnp.zeros((2,), jnp.uint32)}
    if guarded:
        make = step_lib.make_train_step
    else:  # the same step with the final selection taken out
        def make(model, tx, schedule):
            saved = step_lib.skip_bad_update
            def unguarded(old, update, metrics, ceiling):
                params, opt_state = update()
                return dict(old, step=old["step"] + 1, params=params, opt_state=opt_state), metrics

            step_lib.skip_bad_update = unguarded
            try:
                return step_lib.make_train_step(model, tx, schedule)
            finally:
                step_lib.skip_bad_update = saved
    step = jax.jit(make(model, tx, lambda s: 1e-4), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, VOCAB, (1, BATCH, SEQ + 1)).astype(np.int32)
    batch = jax.device_put({
        "decoder_input_tokens": tokens[..., :-1], "decoder_target_tokens": tokens[..., 1:],
        "decoder_loss_weights": np.ones((1, BATCH, SEQ), np.float32),
        "decoder_segment_ids": np.ones((1, BATCH, SEQ), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(SEQ), (1, BATCH, SEQ)).astype(np.int32)})
    return step, state, batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    smoke.add_flag(parser)
    args = parser.parse_args(argv)
    smoke.apply(args, globals(), SMOKE_SHAPE, steps=2)

    from kinoe_jax.training import checkpoint as ckpt
    from kinoe_jax.training.resilience import RunGuard

    plain_step, plain_state, batch = build(False)
    guarded_step, guarded_state, _ = build(True)
    workdir = tempfile.mkdtemp(prefix="bench_resilience_")
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), ckpt.CheckpointConfig(async_save=False))
    guard = RunGuard(workdir, manager, watchdog_timeout_s=3600)
    state = {"plain": plain_state, "guarded": guarded_state}

    def run_plain(n, first):
        s = state["plain"]
        for _ in range(n):
            s, m = plain_step(s, batch)
        jax.block_until_ready(m["loss"])
        state["plain"] = s

    def run_guarded(n, first):
        s = state["guarded"]
        for i in range(n):
            done = first + i + 1
            guard.before_step(done, None)
            s, m = guarded_step(s, batch, guard.loss_ceiling())
            guard.after_step(done, m)
            guard.should_stop(done)
        guard.counters()
        jax.block_until_ready(m["loss"])
        state["guarded"] = s

    with guard:
        guard.start(0, None)
        run_plain(2, 0)  # compile and warm up
        run_guarded(2, 0)
        times = {"plain": [], "guarded": []}
        done = 2
        for _ in range(args.rounds):
            for name, fn in (("plain", run_plain), ("guarded", run_guarded)):
                t = time.perf_counter()
                fn(args.steps, done)
                times[name].append((time.perf_counter() - t) / args.steps)
            done += args.steps
        guard.finish()
    manager.close()

    plain, guarded = statistics.median(times["plain"]), statistics.median(times["guarded"])
    print(f"model vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, seq {SEQ}, batch {BATCH}; "
          f"{args.rounds} rounds x {args.steps} steps, {jax.device_count()} {jax.devices()[0].platform} device(s)")
    print(f"plain   {plain * 1e3:8.1f} ms/step  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in times['plain'])})")
    print(f"guarded {guarded * 1e3:8.1f} ms/step  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in times['guarded'])})")
    print(f"guarded / plain = {guarded / plain:.3f}")


if __name__ == "__main__":
    main()
