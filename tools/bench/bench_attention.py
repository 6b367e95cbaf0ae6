"""Attention forward + backward on CPU: kinoe_jax's blocked custom-VJP attention against autodiff
of plain masked softmax attention and against PyTorch's scaled_dot_product_attention.

Shapes of the training benchmark's layer (batch 8, sequence 512, 8 heads, 2 KV heads, head 64),
fp32. Alternating rounds in ONE process; the ratios are the result.

    python tools/bench/bench_attention.py [--rounds 5] [--smoke]
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

B, T, H, KV, D = 8, 512, 8, 2, 64
CHUNKS = (0, 128)  # kinoe_jax's query chunk: 0 is the whole sequence at once
# --smoke: the same runners at a size that compiles and runs in seconds.
SMOKE_SHAPE = dict(B=2, T=64, H=4, KV=2, D=16, CHUNKS=(0, 32))
RESULT_LINE = r"^kinoe_chunk0 .* ms  \(torch_sdpa / this: [0-9.]+x\)$"


def jax_runners():
    from kinoe_jax.models.attention import attend, attention_mask, causal_attention

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, KV, D)), jnp.float32) for _ in range(2))
    seg = jnp.ones((B, T), jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(T)[None], (B, T))
    mask = attention_mask(idx, idx, seg, seg, None)
    plain = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask))), argnums=(0, 1, 2)))
    out = {"plain_autodiff": lambda: jax.block_until_ready(plain(q, k, v))}
    for chunk in CHUNKS:
        f = jax.jit(jax.grad(lambda q, k, v, c=chunk: jnp.sum(jnp.sin(causal_attention(q, k, v, seg, None, c))),
                             argnums=(0, 1, 2)))
        out[f"kinoe_chunk{chunk}"] = lambda f=f: jax.block_until_ready(f(q, k, v))
    return out


def torch_runner():
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, KV, T, D, generator=g).repeat_interleave(H // KV, 1).requires_grad_()
    v = torch.randn(B, KV, T, D, generator=g).repeat_interleave(H // KV, 1).requires_grad_()

    def run():
        q.grad = k.grad = v.grad = None
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sin().sum().backward()

    return run


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="a toy size, a step or two: shows that the benchmark runs, measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        globals().update(SMOKE_SHAPE)
        args.rounds = 1
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    runners = dict(jax_runners(), torch_sdpa=torch_runner())
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            s = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - s)
    ref = statistics.median(times["torch_sdpa"])
    print(f"attention fwd+bwd, batch {B}, seq {T}, heads {H}/{KV}, head {D}, fp32, {os.cpu_count()} threads")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:16s} {t * 1e3:7.1f} ms  (torch_sdpa / this: {ref / t:.2f}x)")


if __name__ == "__main__":
    main()
