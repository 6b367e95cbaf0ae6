"""What the per-group statistics cost per training step.

"off": the jitted step as kinoe_jax.train builds it with `param_stats.enabled = False`; "on": the
same step adding grad, update and parameter norms, update ratios and Adam's second-moment
statistics per group (kinoe_jax/training/resilience/param_stats.py). The metrics come back to the
host every step, as at a logging step, so the transfer is counted too.

Both run in alternating rounds inside ONE process, so machine noise hits both alike; the ratio
is the result. Also reports how many more fusions / HLO instructions the compiled step has.

    python tools/bench/bench_param_stats.py [--rounds 5] [--steps 10] [--layers 4] [--hidden 256]
    python tools/bench/bench_param_stats.py --smoke     # a tiny model, one round: checks it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # a CPU machine with the chip compilers installed stays on the CPU, quietly

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


# The line tests/e2e/test_bench_smoke.py looks for after --smoke.
RESULT_LINE = r"^on / off = [0-9.]+$"


def build(stats: bool, vocab: int, hidden: int, layers: int, seq: int, batch: int):
    import flax.linen as nn

    from kinoe_jax.models import ModelConfig, Transformer
    from kinoe_jax.training import optim
    from kinoe_jax.training import step as step_lib

    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_layers=layers,
                      num_heads=max(hidden // 64, 2), num_kv_heads=max(hidden // 128, 1), max_seq_len=seq)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, seq), jnp.int32))["params"])
    tx, schedule = optim.make_optimizer(1000)  # the project's AdamW chain: clipping, decay mask
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jnp.zeros((2,), jnp.uint32)}
    jitted = jax.jit(step_lib.make_train_step(model, tx, schedule, group_stats=stats), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, vocab, (1, batch, seq + 1)).astype(np.int32)
    data = jax.device_put({
        "decoder_input_tokens": tokens[..., :-1], "decoder_target_tokens": tokens[..., 1:],
        "decoder_loss_weights": np.ones((1, batch, seq), np.float32),
        "decoder_segment_ids": np.ones((1, batch, seq), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(seq), (1, batch, seq)).astype(np.int32)})
    args = (np.float32(np.inf), None, np.float32(1.0))
    step = jitted.lower(state, data, *args).compile()  # one compile serves the timing and the HLO count
    hlo = step.as_text()
    size = {"fusions": hlo.count(" fusion("), "instructions": sum(1 for line in hlo.splitlines() if " = " in line)}
    return step, state, data, args, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one round of two steps")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.vocab, args.hidden, args.layers, args.seq, args.batch = 1, 2, 256, 64, 2, 32, 2
    shape = (args.vocab, args.hidden, args.layers, args.seq, args.batch)
    runs = {name: list(build(name == "on", *shape)) for name in ("off", "on")}

    def run(name: str, n: int) -> None:
        step, state, data, extra, _ = runs[name]
        for _ in range(n):
            state, metrics = step(state, data, *extra)
            jax.device_get(metrics)  # every step as a logging step: the statistics come to the host
        runs[name][1] = state

    for name in runs:  # compile and warm up
        run(name, 2)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name in runs:
            t = time.perf_counter()
            run(name, args.steps)
            times[name].append((time.perf_counter() - t) / args.steps)

    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"model vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch "
          f"{args.batch}; {args.rounds} rounds x {args.steps} steps, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)")
    for name, median in (("off", off), ("on", on)):
        size = runs[name][4]
        print(f"stats {name:3s} {median * 1e3:8.1f} ms/step  (rounds: {', '.join(f'{x * 1e3:.1f}' for x in times[name])}; "
              f"{size['fusions']} fusions, {size['instructions']} HLO instructions)")
    print(f"on / off = {on / off:.3f}")


if __name__ == "__main__":
    main()
