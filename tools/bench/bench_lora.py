"""LoRA SFT against full SFT: training tokens/s of the same step at the same shape.

LoRA computes no gradient for the frozen weights (only the activation gradients that flow
through them) and runs AdamW on the adapters alone, so its step should be faster. Both steps are
the training loop's own (kinoe_jax.train.make_train_step on the abstract state it builds), on the
tiny_ja preset at the SFT run's shape (sequences of 512, 8 per step, SFT loss weights), and are
timed in alternating rounds inside ONE process so machine noise hits both alike; the ratio is
the result.

    python tools/bench/bench_lora.py [--rounds 5] [--steps 5] [--rank 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

SEQ, BATCH = 512, 8


def tiny_ja():
    import gin

    from kinoe_jax.config_io import load_gin
    from kinoe_jax.models import ModelConfig

    load_gin(["gin_configs/models/tiny_ja.gin"])
    cfg = ModelConfig()
    gin.clear_config()
    return dataclasses.replace(cfg, max_seq_len=SEQ)


def build(cfg):
    import flax.linen as nn

    from kinoe_jax import optim
    from kinoe_jax import train as train_lib
    from kinoe_jax.models import Transformer
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.parallel.rules import flax_rules

    mesh = make_mesh(devices=jax.devices()[:1])
    model = Transformer(cfg)
    tx, schedule = optim.make_optimizer(1000)
    _, shardings, _ = train_lib.abstract_state(model, cfg, tx, mesh, SEQ, False, 0)
    with jax.set_mesh(mesh):
        state = train_lib.init_state(model, tx, shardings, SEQ, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):  # as the training loop does
        step = jax.jit(train_lib.make_train_step(model, tx, schedule), donate_argnums=(0,))
        rng = np.random.default_rng(0)
        tokens = rng.integers(4, cfg.vocab_size, (1, BATCH, SEQ + 1)).astype(np.int32)
        weights = np.zeros((1, BATCH, SEQ), np.float32)
        weights[..., SEQ // 3:] = 1.0  # an SFT row: loss on the reply only
        batch = jax.device_put({
            "decoder_input_tokens": tokens[..., :-1], "decoder_target_tokens": tokens[..., 1:],
            "decoder_loss_weights": weights, "decoder_segment_ids": np.ones((1, BATCH, SEQ), np.int32),
            "decoder_positions": np.broadcast_to(np.arange(SEQ), (1, BATCH, SEQ)).astype(np.int32)})
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
    return step, state, batch, mesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import flax.linen as nn

    from kinoe_jax.models.lora import LoraConfig
    from kinoe_jax.parallel.rules import flax_rules

    full_cfg = tiny_ja()
    lora_cfg = dataclasses.replace(full_cfg, lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank))
    runs = {"full": list(build(full_cfg)), "lora": list(build(lora_cfg))}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            step, state, batch, mesh = run
            with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
                t = time.perf_counter()
                for _ in range(args.steps):
                    state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                times[name].append((time.perf_counter() - t) / args.steps)
            run[1] = state
    tokens = BATCH * SEQ
    print(f"tiny_ja, {BATCH} x {SEQ} tokens per step, LoRA rank {args.rank} on all 7 projections, "
          f"{args.rounds} rounds x {args.steps} steps, {jax.devices()[0].device_kind}")
    for name in runs:
        med = statistics.median(times[name])
        print(f"  {name:5s} step {med * 1000:8.1f} ms (min {min(times[name]) * 1000:.1f})  {tokens / med:10,.0f} tokens/s")
    ratio = statistics.median(times["full"]) / statistics.median(times["lora"])
    print(f"LoRA / full tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
