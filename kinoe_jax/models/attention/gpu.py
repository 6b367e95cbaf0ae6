"""cuDNN flash attention (attention_impl "cudnn", the GPU's) through jax.nn.dot_product_attention.

Why cuDNN and this form of it:
- cuDNN's fused attention (FlashAttention-2 style, on Hopper its own kernels) is what JAX offers
  on NVIDIA GPUs without a custom kernel; it takes grouped-query heads natively, skips the masked
  half under `is_causal`, and has the sliding window as a first-class rule (`local_window_size`).
- Packing is the one thing the public API cannot say natively: cuDNN's packed layout (per-segment
  offsets) is not exposed by jax.nn.dot_product_attention. Segments are therefore given as a
  boolean mask [b, 1, t, t], which JAX turns into an additive bias the kernel reads (and whose
  gradient it writes) per layer: t^2 bytes per sequence of traffic, small next to the t^2 * d
  FLOPs. JAX's Pallas GPU kernel (jax.experimental.pallas.ops.gpu.attention) does take segment
  ids, but has no sliding window (which kinoe_9b uses) and no grouped-query heads, so it would
  cost more than this.
- cuDNN computes in bf16/fp16 only; a float32 model on a GPU uses the blocked attention.

`implementation="xla"` runs the same call through XLA's reference attention: that is how the
argument mapping (scale, causal rule, window, segment mask, GQA) is tested on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kinoe_jax.models.attention import sharded

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_attention(q, k, v, segment_ids, sliding_window=None, implementation: str = "cudnn"):
    """q [b, t, h, d]; k, v [b, t, kv, d]; segment_ids [b, t] -> [b, t, h, d]."""
    t = q.shape[1]
    if implementation == "cudnn" and q.dtype not in CUDNN_DTYPES:
        raise ValueError(f"attention_impl 'cudnn' needs ModelConfig.dtype bfloat16 or float16, got {q.dtype}")
    window = (sliding_window - 1, 0) if sliding_window is not None and sliding_window < t else None

    def per_device(q, k, v, seg_q, seg_kv):
        same_doc = seg_q[:, None, :, None] == seg_kv[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=same_doc, is_causal=True, local_window_size=window,
                                            implementation=implementation)

    mesh = sharded.current_mesh()
    if mesh is None:
        return per_device(q, k, v, segment_ids, segment_ids)
    split = sharded.plan(q.shape, k.shape[2], mesh, split_length=False)
    return sharded.run(per_device, q, k, v, segment_ids, split, mesh)
