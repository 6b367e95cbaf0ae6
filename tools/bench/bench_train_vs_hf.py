"""Training throughput: kinoe_jax against Hugging Face transformers' MistralForCausalLM (PyTorch).

Same CPU, same threads, same model (vocab 8000, hidden 512, 8 layers, 8 heads, 2 KV heads,
FFN 1408), sequence 512, batch 8, fp32, AdamW. The two frameworks are timed in alternating
rounds inside ONE process so that machine noise hits both alike; the ratio is the result.

    python tools/bench/bench_train_vs_hf.py [--rounds 5] [--steps 3] [--variants] [--matmuls] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.bench import _smoke as smoke  # noqa: E402

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # a CPU machine with the chip compilers installed stays on the CPU, quietly

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, KV, FFN, SEQ, BATCH = 8000, 512, 8, 8, 2, 1408, 512, 8
# --smoke: the same two steps on a model that compiles and runs in seconds.
SMOKE_SHAPE = dict(VOCAB=512, HIDDEN=64, LAYERS=2, HEADS=4, KV=2, FFN=128, SEQ=64, BATCH=2)
RESULT_LINE = r"^ratio kinoe_jax / hf_torch: [0-9.]+x$"


def kinoe_step(scan_layers: bool = True, remat_policy: str = "dots_no_batch"):
    import flax.linen as nn
    import optax

    from kinoe_jax.models import ModelConfig, Transformer
    from kinoe_jax.training.step import make_train_step

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_layers=LAYERS,
                      num_heads=HEADS, num_kv_heads=KV, max_seq_len=SEQ, scan_layers=scan_layers,
                      remat_policy=remat_policy)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))["params"])
    tx = optax.adamw(1e-4, weight_decay=0.0)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jnp.zeros((2,), jnp.uint32)}
    step = jax.jit(make_train_step(model, tx, lambda s: 1e-4), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, VOCAB, (1, BATCH, SEQ + 1)).astype(np.int32)
    batch = {"decoder_input_tokens": tokens[..., :-1], "decoder_target_tokens": tokens[..., 1:],
             "decoder_loss_weights": np.ones((1, BATCH, SEQ), np.float32),
             "decoder_segment_ids": np.ones((1, BATCH, SEQ), np.int32),
             "decoder_positions": np.broadcast_to(np.arange(SEQ), (1, BATCH, SEQ)).astype(np.int32)}
    batch = jax.device_put(batch)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
        return float(metrics["loss"])

    return cfg, run


def hf_step():
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=SEQ,
                           sliding_window=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(4, VOCAB, (BATCH, SEQ)).astype(np.int64))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        return float(loss)

    return run


def matmul_peaks(n: int = 2048) -> tuple[float, float]:
    import torch

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = torch.ones((n, n))
    torch.mm(t, t)
    jt, tt = [], []
    for _ in range(5):
        s = time.perf_counter()
        f(a).block_until_ready()
        jt.append(time.perf_counter() - s)
        s = time.perf_counter()
        torch.mm(t, t)
        tt.append(time.perf_counter() - s)
    flops = 2 * n ** 3
    return flops / min(jt), flops / min(tt)


def matmul_shapes() -> None:
    """XLA's CPU matmul against PyTorch's on this model's shapes: x @ W (forward) and x^T @ dy
    (weight gradient). The ratio bounds what the rest of the step can make up."""
    import torch

    dg = jax.lax.dot_general
    fwd = jax.jit(lambda a, b: a @ b)
    wgrad = jax.jit(lambda a, b: dg(a, b, (((0,), (0,)), ((), ()))))
    m = BATCH * SEQ

    def best(f, n=5):
        f()
        ts = []
        for _ in range(n):
            s = time.perf_counter()
            f()
            ts.append(time.perf_counter() - s)
        return min(ts)

    print("matmul GFLOP/s, jax vs torch (ratio):")
    rng = np.random.default_rng(0)
    for k, n in [(HIDDEN, FFN), (FFN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN // HEADS * KV), (HIDDEN, VOCAB)]:
        x, w, dy = (rng.random(s, dtype=np.float32) for s in [(m, k), (k, n), (m, n)])
        jx, jw, jdy = jax.device_put(x), jax.device_put(w), jax.device_put(dy)
        tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
        flops = 2 * m * k * n
        rows = []
        for label, jf, tf in [("x@W", lambda: fwd(jx, jw).block_until_ready(), lambda: tx @ tw),
                              ("x^T@dy", lambda: wgrad(jx, jdy).block_until_ready(), lambda: tx.T @ tdy)]:
            j, t = flops / best(jf) / 1e9, flops / best(tf) / 1e9
            rows.append(f"{label} {j:4.0f} vs {t:4.0f} ({j / t:.2f})")
        print(f"  [{m}x{k}] x [{k}x{n}]: " + ",  ".join(rows))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per framework per round")
    parser.add_argument("--matmuls", action="store_true", help="also compare matmul speed on the model's shapes")
    parser.add_argument("--variants", action="store_true",
                        help="also time kinoe_jax without rematerialisation and with layers unrolled")
    smoke.add_flag(parser)
    args = parser.parse_args(argv)
    smoke.apply(args, globals(), SMOKE_SHAPE)

    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"machine: {platform.processor() or platform.machine()}, {threads} threads, jax {jax.__version__}, "
          f"torch {torch.__version__}, devices {jax.devices()}")
    cfg, jax_run = kinoe_step(scan_layers=True)
    runners = {"kinoe_jax": jax_run, "hf_torch": hf_step()}
    if args.variants:
        runners["kinoe_jax_no_remat"] = kinoe_step(remat_policy="none")[1]
        runners["kinoe_jax_unrolled"] = kinoe_step(scan_layers=False)[1]
    for name, run in runners.items():  # compile / warm up
        run()
        run()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            s = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - s) / args.steps)
    jax_peak, torch_peak = matmul_peaks(256 if args.smoke else 2048)
    if args.matmuls:
        matmul_shapes()
    tokens = BATCH * SEQ
    flops_per_step = cfg.flops_per_token(SEQ) * tokens
    print(f"large fp32 matmul: jax {jax_peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} GFLOP/s")
    result = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        peak = torch_peak if name.startswith("hf") else jax_peak
        result[name] = tokens / t
        print(f"{name:20s} {t * 1e3:8.1f} ms/step  {tokens / t:8.0f} tokens/s  MFU {flops_per_step / t / peak:6.1%}"
              f"  (rounds: {', '.join(f'{x * 1e3:.0f}' for x in ts)} ms)")
    print(f"ratio kinoe_jax / hf_torch: {result['kinoe_jax'] / result['hf_torch']:.2f}x")
    for name in result:
        if name.startswith("kinoe_jax_"):
            print(f"ratio {name} / hf_torch: {result[name] / result['hf_torch']:.2f}x")


if __name__ == "__main__":
    main()
