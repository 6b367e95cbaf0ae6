"""The blocked attention (attention_impl "blocked", the CPU's), plain attention for KV-cache
decoding, and the mask both use.

The training path (`causal_attention`) works in query blocks that only look at the keys they
can reach (causality and the sliding window make the rest all-masked) and has its own VJP in
the manner of FlashAttention: the forward keeps only the output and each row's log-sum-exp,
and the backward recomputes the probabilities block by block. Autodiff would keep every
layer's [batch, heads, queries, keys] probabilities for the backward pass (O(T^2) memory, and
a scanned stack copies them into a stacked buffer), or, under a remat policy, rerun the whole
attention forward inside the backward. With the residuals named below a dots policy keeps
the small ones instead. On the CPU training benchmark the step is 4-5% faster than with the
same blocks under autodiff; alone, blocked attention is 1.6x autodiff of one masked square
(tools/bench/bench_attention.py).

Heads are laid out kv-head-major with each group's queries stacked, so every product is a
plain batched matmul (grouped-query attention without repeating k/v).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Large negative rather than -inf: a fully masked row (padding) must not produce NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos, k_pos, q_seg, k_seg, sliding_window):
    """[batch, q, k] boolean: causal, same packed segment, not padding, inside the window.

    q_pos/k_pos are indices in the (packed or cached) sequence, not the per-segment positions,
    so causality holds across the whole row and segments never see each other.
    """
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    mask &= q_seg[:, :, None] == k_seg[:, None, :]
    mask &= k_seg[:, None, :] != 0
    if sliding_window is not None:
        mask &= q_pos[:, :, None] - k_pos[:, None, :] < sliding_window
    return mask


def _group(x, kv):
    """[b, t, h, d] -> [b, kv, g*t, d]: the g query heads sharing one kv head, stacked."""
    b, t, h, d = x.shape
    g = h // kv
    return x.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)


def _ungroup(x, h):
    b, kv, gt, d = x.shape
    g = h // kv
    return x.reshape(b, kv, g, gt // g, d).transpose(0, 3, 1, 2, 4).reshape(b, gt // g, h, d)


def _where_mask(x, mask, fill):
    """x [b, kv, g*t, s] kept where mask [b, t, s] holds (for every head of the group), else fill."""
    b, kv, gt, s = x.shape
    t = mask.shape[1]
    return jnp.where(mask[:, None, None], x.reshape(b, kv, gt // t, t, s), fill).reshape(b, kv, gt, s)


def _masked_logits(qg, kt, mask):
    """qg [b, kv, g*t, d] (already scaled), kt [b, kv, s, d], mask [b, t, s] -> fp32 logits."""
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32)
    return _where_mask(logits, mask, MASK_VALUE)


def attend(q, k, v, mask):
    """Plain grouped-query attention (used with the KV cache). q [b, t, h, d]; k, v [b, s, kv, d]."""
    h, kv = q.shape[2], k.shape[2]
    qg = _group(q * q.shape[-1] ** -0.5, kv)
    probs = jax.nn.softmax(_masked_logits(qg, k.transpose(0, 2, 1, 3), mask), axis=-1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), v.transpose(0, 2, 1, 3))
    return _ungroup(out, h)


def _blocks(t: int, chunk: int, window):
    """Static (start, end, first visible key) of each query block."""
    if not chunk or t <= chunk or t % chunk:
        return [(0, t, 0)]
    return [(s, s + chunk, max(0, s - window + 1) if window else 0) for s in range(0, t, chunk)]


def _block_mask(segment_ids, start, end, lo, window):
    b, t = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    return attention_mask(idx[:, start:end], idx[:, lo:end], segment_ids[:, start:end],
                          segment_ids[:, lo:end], window)


def _forward(q, k, v, segment_ids, window, chunk):
    h, kv = q.shape[2], k.shape[2]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for start, end, lo in _blocks(q.shape[1], chunk, window):
        mask = _block_mask(segment_ids, start, end, lo, window)
        logits = _masked_logits(_group(q[:, start:end] * scale, kv), kt[:, :, lo:end], mask)
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        # Normalise the [.., d] output rather than the [.., keys] probabilities: one pass fewer.
        o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vt[:, :, lo:end],
                       preferred_element_type=jnp.float32) / denom
        outs.append(_ungroup(o.astype(q.dtype), h))
        lses.append(m + jnp.log(denom))
    return jnp.concatenate(outs, axis=1), lses


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def causal_attention(q, k, v, segment_ids, sliding_window=None, chunk=128):
    """Causal (optionally windowed), segment-isolated attention over a whole packed sequence.

    q [b, t, h, d]; k, v [b, t, kv, d]; segment_ids [b, t] (0 = padding) -> [b, t, h, d].
    """
    return _forward(q, k, v, segment_ids, sliding_window, chunk)[0]


# Names under which a remat policy can keep the residuals (decoder.REMAT does): recomputing
# them would repeat the whole attention forward inside the backward pass. The chip kernels
# name theirs KERNEL_RESIDUAL (the package exports all of them as RESIDUAL_NAMES).
BLOCKED_RESIDUAL_NAMES = ("attention_out", "attention_lse")
KERNEL_RESIDUAL = "attention_kernel_residual"
RESIDUAL_NAMES = BLOCKED_RESIDUAL_NAMES + (KERNEL_RESIDUAL,)


def _fwd(q, k, v, segment_ids, sliding_window, chunk):
    out, lses = _forward(q, k, v, segment_ids, sliding_window, chunk)
    out = checkpoint_name(out, RESIDUAL_NAMES[0])
    lses = [checkpoint_name(x, RESIDUAL_NAMES[1]) for x in lses]
    return out, (q, k, v, segment_ids, out, lses)


def _bwd(sliding_window, chunk, residuals, d_out):
    q, k, v, segment_ids, out, lses = residuals
    b, t, h, d = q.shape
    kv, dtype = k.shape[2], q.dtype
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scale = d ** -0.5
    # Key/value gradients are accumulated transposed, [b, kv, d, t]: XLA:CPU ran d_out^T @ probs
    # 1.4-1.7x faster than probs^T @ d_out at the benchmark's shapes (blocked attention as a
    # whole: 120 -> 113 ms in tools/bench/bench_attention.py).
    dk_t = jnp.zeros((b, kv, d, t), jnp.float32)
    dv_t = jnp.zeros((b, kv, d, t), jnp.float32)
    dq = []
    for (start, end, lo), lse in zip(_blocks(t, chunk, sliding_window), lses):
        mask = _block_mask(segment_ids, start, end, lo, sliding_window)
        qg = _group(q[:, start:end] * scale, kv)
        dog = _group(d_out[:, start:end], kv)
        og = _group(out[:, start:end], kv)
        probs = jnp.exp(_masked_logits(qg, kt[:, :, lo:end], mask) - lse)
        dp = jnp.einsum("bkqd,bksd->bkqs", dog, vt[:, :, lo:end], preferred_element_type=jnp.float32)
        delta = jnp.sum(dog.astype(jnp.float32) * og.astype(jnp.float32), axis=-1, keepdims=True)
        # Masked logits are constants: no gradient through them, even in all-masked padding rows.
        ds = _where_mask(probs * (dp - delta), mask, 0.0).astype(dtype)
        dqg = jnp.einsum("bkqs,bksd->bkqd", ds, kt[:, :, lo:end], preferred_element_type=jnp.float32) * scale
        dq.append(_ungroup(dqg.astype(dtype), h))
        dk_t = dk_t.at[..., lo:end].add(jnp.einsum("bkqd,bkqs->bkds", qg, ds, preferred_element_type=jnp.float32))
        dv_t = dv_t.at[..., lo:end].add(
            jnp.einsum("bkqd,bkqs->bkds", dog, probs.astype(dtype), preferred_element_type=jnp.float32))
    back = lambda x, like: x.transpose(0, 3, 1, 2).astype(like.dtype)  # noqa: E731
    return jnp.concatenate(dq, axis=1), back(dk_t, k), back(dv_t, v), None


causal_attention.defvjp(_fwd, _bwd)
