"""Temporaries the chunked LM head saves per device, on a chip's own compiler.

    python tools/bench/bench_lm_head.py [--presets=kinoe_9b,mistral_7b] [--target=v5p-16]
        [--per_device=8] [--seq_len=4096] [--remat=full] [--chunks=0,512] [--vocab=0] [--full_step]
    python tools/bench/bench_lm_head.py --smoke   # tiny_ja on v5p-8, 2 x 128 tokens, in seconds

Default: one device's LM head and loss (final hidden states -> log p(target) -> gradients of
the hidden states and the head), compiled for one device of the target with
ModelConfig.lm_head_chunk = each of --chunks (0: all the logits at once, the old head). With
--full_step: each preset's whole training step (FSDP over the slice), which costs a full
compile per row. The compiler's per-device temporaries are printed with the saving against the
first chunk. Nothing runs on a chip: the compiler's memory analysis is the measurement.
--vocab overrides the presets' vocabulary size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()

import gin  # noqa: E402

from kinoe_jax.config.gin_io import load_gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kinoe_jax.hardware import chips  # noqa: E402
from kinoe_jax.models.lm_head import target_logps  # noqa: E402
from kinoe_jax.models import ModelConfig  # noqa: E402
from kinoe_jax.parallel.mesh import make_mesh  # noqa: E402
from kinoe_jax.planning.fit import compile_train_step  # noqa: E402

GIB = 1024 ** 3
RESULT_LINE = r"^  \S+ +vocab +\d+ lm_head_chunk +\d+: temporaries +[0-9.]+ GiB per device; saved"


def preset(name: str) -> ModelConfig:
    gin.clear_config()
    load_gin([os.path.join("gin_configs", "models", f"{name}.gin")], [])
    cfg = ModelConfig()
    gin.clear_config()
    return cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="kinoe_9b,mistral_7b")
    p.add_argument("--target", default="v5p-16")
    p.add_argument("--per_device", type=int, default=8, help="sequences per device")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--remat", default="full")
    p.add_argument("--chunks", default="0,512")
    p.add_argument("--vocab", type=int, default=0)
    p.add_argument("--full_step", action="store_true")
    p.add_argument("--smoke", action="store_true", help="the tiny preset on a small slice: shows that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.target, args.per_device, args.seq_len, args.chunks = "tiny_ja", "v5p-8", 2, 128, "0,64"
    target = chips.target(args.target)
    devices = target.devices()
    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=devices)
    batch = args.per_device * len(devices)
    print(f"{target.describe()}; {args.per_device} x {args.seq_len} tokens per device, remat {args.remat}")
    for name in args.presets.split(","):
        base = dataclasses.replace(preset(name), remat_policy=args.remat, max_seq_len=args.seq_len)
        if args.vocab:
            base = dataclasses.replace(base, vocab_size=args.vocab)
        first = None
        for chunk in (int(c) for c in args.chunks.split(",")):
            cfg = dataclasses.replace(base, lm_head_chunk=chunk)
            if args.full_step:
                compiled, _ = compile_train_step(cfg, mesh, args.seq_len, batch, 1, False)
            else:
                compiled = head_program(cfg, devices[0], args.per_device, args.seq_len)
            temp = compiled.memory_analysis().temp_size_in_bytes
            first = temp if first is None else first
            print(f"  {name:12s} vocab {cfg.vocab_size:6d} lm_head_chunk {chunk:5d}: temporaries {temp / GIB:7.2f} "
                  f"GiB per device; saved {(first - temp) / GIB:6.2f} GiB", flush=True)
        print(f"  ({'whole step' if args.full_step else 'LM head and loss'}; all logits of one device are "
              f"{args.per_device * args.seq_len * base.vocab_size * 4 / GIB:.2f} GiB fp32)", flush=True)


def head_program(cfg, device, rows: int, seq_len: int):
    """One device's head and loss, forward and backward, as the training step runs them."""
    dt = cfg.compute_dtype
    hidden = jax.ShapeDtypeStruct((rows, seq_len, cfg.hidden_size), dt)
    kernel = jax.ShapeDtypeStruct((cfg.hidden_size, cfg.vocab_size), jnp.float32)
    targets = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)

    def loss(h, w, y):
        if cfg.lm_head_chunk:
            logp = target_logps(h, w, y, cfg.lm_head_chunk, dt)
        else:
            logits = (h.reshape(-1, h.shape[-1]) @ w.astype(dt)).reshape(*h.shape[:2], -1).astype(jnp.float32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1)[..., 0]
        return -jnp.mean(logp)

    sharding = jax.sharding.SingleDeviceSharding(device)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(sharding, sharding, sharding))
    return fn.lower(hidden, kernel, targets).compile()


if __name__ == "__main__":
    main()
