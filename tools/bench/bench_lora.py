"""LoRA SFT against full SFT: training tokens/s of the same step at the same shape.

LoRA computes no gradient for the frozen weights (only the activation gradients that flow
through them) and runs AdamW on the adapters alone, so its step should be faster. All steps are
the training loop's own (kinoe_jax.train.make_train_step on the abstract state it builds), at
the SFT run's shape (sequences of 512, 8 per step, loss on the replies only), timed in
alternating rounds inside ONE process so machine noise hits them alike; ratios are the result.

Three rows: full fine-tuning; LoRA rank 16 on all 7 projections (the run configs'); and a rank-1
adapter on q_proj alone, whose own cost is negligible: the bound LoRA's saving can reach at this
shape on this machine (what is left of the step is the forward, the activation gradients,
attention and the LM head's softmax).

    python tools/bench/bench_lora.py [--model tiny_ja|hidden512] [--rounds 5] [--steps 3] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.bench import _smoke as smoke  # noqa: E402

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # the platform settled and accelerators hidden from TensorFlow, before JAX starts
import jax  # noqa: E402
import numpy as np  # noqa: E402

SEQ, BATCH = 512, 8
# --smoke: the same three steps, one layer deep, on short rows: compiled and run in seconds.
SMOKE_SHAPE = dict(SEQ=64, BATCH=2)
RESULT_LINE = r"^\| LoRA rank 16, 7 projections \| \d+ \| [0-9,]+ \| [0-9.]+x \|$"


def model_config(name: str, layers: int | None = None):
    import gin

    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.models import ModelConfig

    load_gin(["gin_configs/models/tiny_ja.gin"])
    cfg = dataclasses.replace(ModelConfig(), max_seq_len=SEQ)
    gin.clear_config()
    if name == "hidden512":  # tools/bench/bench_train_vs_hf.py's model: matmuls weigh more
        cfg = dataclasses.replace(cfg, vocab_size=8000, hidden_size=512, intermediate_size=1408, num_layers=8,
                                  num_heads=8, num_kv_heads=2)
    return dataclasses.replace(cfg, num_layers=layers) if layers else cfg


def build(cfg):
    import flax.linen as nn

    from kinoe_jax.training import optim
    from kinoe_jax.training import state as state_lib
    from kinoe_jax.training import step as step_lib
    from kinoe_jax.models import Transformer
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.parallel.rules import flax_rules

    mesh = make_mesh(devices=jax.devices()[:1])
    model = Transformer(cfg)
    tx, schedule = optim.make_optimizer(1000)
    _, shardings, _ = state_lib.abstract_state(model, cfg, tx, mesh, SEQ, False, 0)
    with jax.set_mesh(mesh):
        state = state_lib.init_state(model, tx, shardings, SEQ, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):  # as the training loop does
        step = jax.jit(step_lib.make_train_step(model, tx, schedule), donate_argnums=(0,))
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_ja", choices=("tiny_ja", "hidden512"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    smoke.add_flag(parser)
    args = parser.parse_args(argv)
    smoke.apply(args, globals(), SMOKE_SHAPE)

    import flax.linen as nn

    from kinoe_jax.models.lora import LoraConfig
    from kinoe_jax.parallel.rules import flax_rules

    full = model_config(args.model, layers=1 if args.smoke else None)
    configs = {"full fine-tuning": full,
               "LoRA rank 16, 7 projections": dataclasses.replace(full, lora=LoraConfig(rank=16, alpha=32.0)),
               "bound: rank 1 on q_proj": dataclasses.replace(full, lora=LoraConfig(rank=1, alpha=2.0,
                                                                                   targets=("q_proj",)))}
    runs = {name: list(build(cfg)) for name, cfg in configs.items()}
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
    base = statistics.median(times["full fine-tuning"])
    print(f"{args.model} ({full.num_params() / 1e6:.1f}M parameters), {BATCH} x {SEQ} tokens per step, "
          f"{args.rounds} rounds x {args.steps} steps, {jax.devices()[0].device_kind}")
    print("| | ms/step | tokens/s | vs full |")
    print("|---|---:|---:|---:|")
    for name in runs:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1000:.0f} | {tokens / med:,.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
