"""Training-step cost of the sparse MoE against a dense model with the same active parameters.

    python tools/bench/bench_moe.py [--batch=16] [--seq_len=128] [--rounds=7] [--smoke]
    python tools/bench/bench_moe.py --target=v5p-16 [--impls=ragged,gmm] [--layers=2] [--per_device=1]

Every model has the tiny_ja shapes (hidden 256, 4 layers, vocab 4000); the dense one has an FFN
of 704, each expert 352, so top-2 activates the same 704 per token. Variants:
  dense             the dense Mistral (the baseline)
  moe8/16/32        8, 16, 32 experts, top-2, the dropless path this backend uses by default
  moe8_<impl>       8 experts with another dropless implementation (every expert computed,
                    jax.lax.ragged_dot), to show why the default was chosen
  moe8_capacity     8 experts, capacity factor 1.25 (tokens past capacity dropped)
All variants are compiled first, then timed in turns (round-robin) on the same random batch, so
load on the machine hits them alike; the median step time of each is reported with its ratio to
dense. Routing at initialisation is close to balanced, as it is after training with the
load-balancing loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # a CPU machine with the chip compilers installed stays on the CPU, quietly

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kinoe_jax.training import optim  # noqa: E402
from kinoe_jax.models import ModelConfig, Transformer  # noqa: E402
from kinoe_jax.models.moe_kernels import default_impl  # noqa: E402
from kinoe_jax.training.step import make_train_step  # noqa: E402

BASE = ModelConfig(vocab_size=4000, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                   num_kv_heads=2, max_seq_len=512)
EXPERT_FFN = 352
# --smoke: the dense model and moe8, one layer of toy width, so that both compile and step in seconds.
SMOKE_SHAPE = dict(BASE=dataclasses.replace(BASE, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1,
                                            max_seq_len=64), EXPERT_FFN=64)
RESULT_LINE = r"^\| moe8 \| 8 \| \S+ \| \d+ \| [0-9,]+ \| [0-9.]+x \|$"


def variants(impls: list[str]) -> dict[str, ModelConfig]:
    moe = dataclasses.replace(BASE, intermediate_size=EXPERT_FFN, num_experts_per_tok=2)
    out = {"dense": BASE}
    for n in (8, 16, 32):
        out[f"moe{n}"] = dataclasses.replace(moe, num_experts=n)
    for impl in impls:
        out[f"moe8_{impl}"] = dataclasses.replace(moe, num_experts=8, moe_impl=impl)
    out["moe8_capacity"] = dataclasses.replace(moe, num_experts=8, moe_capacity_factor=1.25)
    return out


def build(cfg: ModelConfig, batch: int, seq_len: int):
    model = Transformer(cfg)
    tx, schedule = optim.make_optimizer(1000)
    rng = jax.random.PRNGKey(0)
    params = jax.jit(lambda: nn.meta.unbox(model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]))()
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": rng}
    tokens = np.random.default_rng(0).integers(4, cfg.vocab_size, (1, batch, seq_len + 1)).astype(np.int32)
    micro = {
        "decoder_input_tokens": tokens[..., :-1], "decoder_target_tokens": tokens[..., 1:],
        "decoder_positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, batch, seq_len)),
        "decoder_segment_ids": np.ones((1, batch, seq_len), np.int32),
        "decoder_loss_weights": np.ones((1, batch, seq_len), np.float32),
    }
    step = jax.jit(make_train_step(model, tx, schedule))
    t = time.perf_counter()
    state, metrics = step(state, micro)
    jax.block_until_ready(metrics)
    return step, state, micro, time.perf_counter() - t


def compiled_on(target: str, impls: list[str], layers: int, seq_len: int, per_device: int,
                block: int = 64) -> None:
    """Mixtral-8x7B layers compiled by the target's own compiler with each dropless kernel: the
    compiled figures (memory, FLOPs with each kernel's own cost, roofline time) side by side."""
    from kinoe_jax.hardware import chips
    from kinoe_jax.planning.fit import GIB, fit_report
    from kinoe_jax.parallel.mesh import make_mesh

    tgt = chips.target(target)
    mesh = make_mesh(data=1, fsdp=-1, devices=tgt.devices())
    base = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=layers, num_heads=32,
                       num_kv_heads=8, max_seq_len=seq_len, num_experts=8, num_experts_per_tok=2, dtype="bfloat16",
                       remat_policy="dots_no_batch", moe_block_size=block)
    print(f"{tgt.describe()}: Mixtral-8x7B shapes, {layers} layers, {per_device} x {seq_len} tokens per device\n")
    print("| moe_impl | compile s | temporaries GiB/dev | total GiB/dev | matmul FLOPs (HLO) | kernel FLOPs "
          "(priced) | compiled/formula | roofline s | kernels |\n|---|---|---|---|---|---|---|---|---|")
    for impl in impls:
        r = fit_report(dataclasses.replace(base, moe_impl=impl), mesh, seq_len, per_device * mesh.size,
                       device_memory_gb=tgt.chip.memory_gb, peak_tflops=tgt.chip.peak_tflops,
                       hbm_gbps=tgt.chip.hbm_gbps, target=tgt.name)
        kernels = ", ".join(f"{k['name']} x{k['calls']:.0f}" for k in r.kernels)
        print(f"| {impl} | {r.compile_s:.0f} | {r.temp_bytes / GIB:.2f} | {r.total_bytes / GIB:.2f} | "
              f"{r.matmul_flops:.3e} | {r.kernel_flops:.3e} | {r.flops_compiled / r.flops_formula:.2f} | "
              f"{r.roofline_s:.3f} | {kernels} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--target", default=None,
                        help="instead of timing on this CPU, compile Mixtral layers for this slice (e.g. v5p-16)")
    parser.add_argument("--impls", default="ragged,gmm", help="with --target: the dropless kernels to compare")
    parser.add_argument("--layers", type=int, default=2, help="with --target: layers compiled")
    parser.add_argument("--target_seq_len", type=int, default=4096, help="with --target: sequence length")
    parser.add_argument("--per_device", type=int, default=1, help="with --target: sequences per device")
    parser.add_argument("--moe_block_size", type=int, default=64, help="with --target: rows per block of 'blocks'")
    parser.add_argument("--smoke", action="store_true",
                        help="a toy size, a step or two: shows that the benchmark runs, measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        globals().update(SMOKE_SHAPE)
        args.batch, args.seq_len, args.rounds = 2, 32, 1
    if args.target:
        compiled_on(args.target, args.impls.split(","), args.layers, args.target_seq_len, args.per_device,
                    args.moe_block_size)
        return

    chosen = default_impl()
    others = [i for i in ("dense", "ragged", "blocks") if i != chosen]
    configs = variants(others)
    if args.smoke:
        configs = {name: configs[name] for name in ("dense", "moe8")}
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), default dropless impl "
          f"'{chosen}', batch {args.batch} x {args.seq_len} tokens, {args.rounds} rounds", flush=True)
    runs = {}
    for name, cfg in configs.items():
        step, state, micro, compile_s = build(cfg, args.batch, args.seq_len)
        runs[name] = [step, state, micro]
        print(f"  compiled {name:16s} {compile_s:6.1f} s  params {cfg.num_params() / 1e6:6.2f} M  "
              f"active {cfg.num_params(active_only=True) / 1e6:6.2f} M", flush=True)

    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            step, state, micro = run
            t = time.perf_counter()
            state, metrics = step(state, micro)
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t)
            run[1] = state
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    base = statistics.median(times["dense"])
    tokens = args.batch * args.seq_len
    print(f"\n| variant | experts | impl | step (ms, median) | tokens/s | vs dense |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        cfg = configs[name]
        med = statistics.median(ts)
        impl = "-" if not cfg.num_experts else (
            f"capacity {cfg.moe_capacity_factor}" if cfg.moe_capacity_factor else
            (chosen if cfg.moe_impl == "auto" else cfg.moe_impl))
        print(f"| {name} | {cfg.num_experts or '-'} | {impl} | {med * 1e3:.0f} | {tokens / med:,.0f} | "
              f"{med / base:.2f}x |")


if __name__ == "__main__":
    main()
