"""Tokens/s and MFU of the 1B-class preset on a GPU or TPU, for each attention and MoE kernel.

    python tools/bench/bench_accelerator.py [--batch_per_device=4] [--seq_len=2048] [--steps=10]
        [--out runs/bench_accelerator.json]
    python tools/bench/bench_accelerator.py --smoke

One short run on the attached accelerator (all local devices, FSDP mesh): the kinoe_1b preset in
bf16 with each training attention this platform offers (the chip kernel and the blocked JAX
attention), then an 8-expert top-2 MoE of the same active size with each dropless kernel, then the
low-precision matmuls the chip has (fp8 on H100/H200, int8 on TPU v5e/v5p/v6e). Every
variant is compiled first, then timed in turns; MFU is tokens/s x (6N + 12LHQT) over the devices'
dense bf16 peak (kinoe_jax/hardware/chips.py). It refuses to run on a CPU: these are accelerator numbers.
--smoke: a toy model, two steps of each variant; on a CPU the chip kernels are left out and the blocked
attention and the ragged MoE run instead, against a nominal 1 TFLOP/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PRESET = "gin_configs/models/kinoe_1b.gin"
KERNELS = {"gpu": {"attention": ("cudnn", "blocked"), "moe": ("ragged", "blocks")},
           "tpu": {"attention": ("splash", "blocked"), "moe": ("gmm", "ragged")}}
CPU_SMOKE_KERNELS = {"attention": ("blocked",), "moe": ("ragged",)}
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   sliding_window=None, max_seq_len=64)
RESULT_LINE = r"^\| dense attention=\S+ \| [0-9.]+ \| [0-9,]+ \| [0-9,]+ \| [0-9.]+% \|$"


def variants(platform: str, base, kernels: dict | None = None, matmul_modes: tuple = ()) -> dict:
    """Each attention kernel, each MoE kernel, then each low-precision matmul mode the chip has
    (ModelConfig.matmul_dtype) on the dense model and on the first MoE kernel."""
    kernels = kernels or KERNELS[platform]
    out = {f"dense attention={a}": dataclasses.replace(base, attention_impl=a) for a in kernels["attention"]}
    moe = dataclasses.replace(base, intermediate_size=base.intermediate_size // 2, num_experts=8,
                              num_experts_per_tok=2)
    out.update({f"moe8 top-2 moe_impl={m}": dataclasses.replace(moe, moe_impl=m) for m in kernels["moe"]})
    for mode in matmul_modes:
        out[f"dense matmul_dtype={mode}"] = dataclasses.replace(base, matmul_dtype=mode)
        out[f"moe8 top-2 moe_impl={kernels['moe'][0]} matmul_dtype={mode}"] = dataclasses.replace(
            moe, moe_impl=kernels["moe"][0], matmul_dtype=mode)
    return out


def batch_for(cfg, global_batch: int, seq_len: int, seed: int = 0):
    """Random tokens packed two documents to a row (segment ids and per-document positions)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, cfg.vocab_size, (1, global_batch, seq_len + 1)).astype(np.int32)
    cut = seq_len // 3
    seg = np.where(np.arange(seq_len) < cut, 1, 2).astype(np.int32)
    pos = np.where(np.arange(seq_len) < cut, np.arange(seq_len), np.arange(seq_len) - cut).astype(np.int32)
    shape = (1, global_batch, seq_len)
    return {"decoder_input_tokens": tokens[..., :-1], "decoder_target_tokens": tokens[..., 1:],
            "decoder_segment_ids": np.broadcast_to(seg, shape), "decoder_positions": np.broadcast_to(pos, shape),
            "decoder_loss_weights": np.ones(shape, np.float32)}


def build(cfg, mesh, global_batch: int, seq_len: int):
    import flax.linen as nn
    import jax

    from kinoe_jax.training import optim
    from kinoe_jax.training import state as state_lib
    from kinoe_jax.training import step as step_lib
    from kinoe_jax.models import Transformer
    from kinoe_jax.parallel import sharding as shd
    from kinoe_jax.parallel.rules import flax_rules

    model = Transformer(cfg)
    tx, schedule = optim.make_optimizer(1000)
    _, shardings, _ = state_lib.abstract_state(model, cfg, tx, mesh, seq_len, False, 0)
    batch = batch_for(cfg, global_batch, seq_len)
    batch_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec(mesh, batch["decoder_input_tokens"].shape))
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
        state = state_lib.init_state(model, tx, shardings, seq_len, 0)
        batch = jax.device_put(batch, batch_sharding)
        step = jax.jit(step_lib.make_train_step(model, tx, schedule), in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=(0,))
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    return step, state, batch, time.perf_counter() - t


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_per_device", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="override the card's dense bf16 peak")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="a toy size, a step or two: shows that the benchmark runs, measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_per_device, args.seq_len, args.steps = 1, 64, 2

    from kinoe_jax.hardware import runtime as platform_lib

    platform_lib.setup()
    import flax.linen as nn
    import gin
    import jax

    from kinoe_jax.hardware.chips import chip_for_device_kind, low_precision_modes
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.models import ModelConfig
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.parallel.rules import flax_rules

    backend = jax.default_backend()
    kernels = KERNELS.get(backend)
    if kernels is None and args.smoke:
        kernels = CPU_SMOKE_KERNELS
        print(f"smoke on {backend}: the GPU and TPU kernels are left out; the blocked attention and the ragged MoE "
              "run instead, MFU against a nominal 1 TFLOP/s", flush=True)
    elif kernels is None:
        raise SystemExit(f"bench_accelerator measures a GPU or TPU, and JAX sees only {backend!r} devices "
                         f"({jax.devices()[0].device_kind}); run it on an accelerator machine")
    kind = jax.devices()[0].device_kind
    chip = chip_for_device_kind(kind)
    if chip is None and not args.peak_tflops and not args.smoke:
        raise SystemExit(f"no peak FLOP/s known for {kind!r}: pass --peak_tflops")
    peak = (args.peak_tflops or (chip.peak_tflops if chip else 1.0)) * 1e12
    gin.clear_config()
    load_gin([PRESET], [])
    base = ModelConfig()
    if args.smoke:
        base = dataclasses.replace(base, **SMOKE_SHAPE)
    mesh = make_mesh(data=1, fsdp=-1, devices=jax.local_devices())
    n = mesh.size
    global_batch = args.batch_per_device * n
    tokens = global_batch * args.seq_len
    print(f"{n} x {kind} ({backend}), peak {peak / 1e12:g} TFLOP/s each; "
          f"{'a toy model' if args.smoke else 'kinoe_1b'} bf16, "
          f"{global_batch} x {args.seq_len} tokens per step", flush=True)

    runs = {}
    modes = () if args.smoke or chip is None else low_precision_modes(chip)
    for name, cfg in variants(backend, base, kernels, modes).items():
        try:
            step, state, batch, compile_s = build(cfg, mesh, global_batch, args.seq_len)
        except Exception as e:  # noqa: BLE001 - one kernel failing must not hide the others
            print(f"  {name}: failed to build ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
            continue
        runs[name] = dict(cfg=cfg, step=step, state=state, batch=batch, times=[], compile_s=compile_s)
        print(f"  compiled {name} in {compile_s:.0f} s", flush=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
        for _ in range(args.steps):
            for run in runs.values():
                t = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - t)

    results = []
    print("\n| variant | step (ms, median) | tokens/s | tokens/s/device | MFU |\n|---|---|---|---|---|")
    for name, run in runs.items():
        med = statistics.median(run["times"])
        tps = tokens / med
        mfu = tps * run["cfg"].flops_per_token(args.seq_len) / (n * peak)
        results.append(dict(variant=name, step_ms=med * 1e3, tokens_per_s=tps, mfu=mfu, device_kind=kind,
                            devices=n, compile_s=run["compile_s"], times_ms=[t * 1e3 for t in run["times"]]))
        print(f"| {name} | {med * 1e3:.1f} | {tps:,.0f} | {tps / n:,.0f} | {mfu:.1%} |")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
