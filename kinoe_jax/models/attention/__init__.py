"""Attention, with the training kernel chosen by the platform of the mesh's devices.

  blocked  query blocks with their own VJP in plain JAX (blocked.py): the CPU's choice, and
           the fallback anywhere a chip kernel cannot take the shapes
  splash   Pallas splash attention under shard_map (splash.py): the TPU's choice
  cudnn    cuDNN flash attention via jax.nn.dot_product_attention (gpu.py): the GPU's choice

`ModelConfig.attention_impl = "auto"` picks by platform; docs/chips.md says why each one.
KV-cache decoding always uses `attend` (one query block against the cache).
"""

from __future__ import annotations

import jax.numpy as jnp

from kinoe_jax.models.attention.blocked import (  # noqa: F401  (the package's public names)
    KERNEL_RESIDUAL, MASK_VALUE, RESIDUAL_NAMES, attend, attention_mask, causal_attention)
from kinoe_jax.models.attention.gpu import cudnn_attention
from kinoe_jax.models.config import ATTENTION_IMPLS as IMPLS
from kinoe_jax.hardware.runtime import mesh_platform


def choose(impl: str, platform: str, seq_len: int, dtype) -> str:
    """The implementation `impl` means on `platform` (auto falls back where a kernel can't run)."""
    if impl not in IMPLS:
        raise ValueError(f"ModelConfig.attention_impl {impl!r} not one of {IMPLS}")
    if impl != "auto":
        return impl
    if platform == "tpu" and seq_len % 128 == 0:
        return "splash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "blocked"


def training_attention(q, k, v, segment_ids, cfg):
    """Causal, segment-isolated (optionally windowed) attention over packed rows.

    q [b, t, h, d]; k, v [b, t, kv, d]; segment_ids [b, t] (0 = padding) -> [b, t, h, d].
    """
    impl = choose(cfg.attention_impl, mesh_platform(), q.shape[1], q.dtype)
    if impl == "splash":
        # TPU-only: splash loads Pallas' TPU kernels, which a CPU or GPU install may lack.
        from kinoe_jax.models.attention.splash import splash_attention  # noqa: PLC0415

        return splash_attention(q, k, v, segment_ids, cfg.sliding_window, cfg.attention_block_q,
                                cfg.attention_block_kv, block_q_dkv=cfg.attention_block_q_dkv,
                                block_kv_dkv=cfg.attention_block_kv_dkv)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, segment_ids, cfg.sliding_window)
    return causal_attention(q, k, v, segment_ids, cfg.sliding_window, cfg.attention_chunk)
