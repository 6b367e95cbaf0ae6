"""Choosing the next token: greedy, or sampled with temperature, top-k and top-p.

The settings are traced scalars, so changing them never recompiles; `lax.cond` runs only the
branch a call asks for (greedy decoding does not pay for the sort).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_top_p(logits, top_p):
    """Keep the smallest set of tokens whose probability mass reaches top_p (nucleus sampling)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    return jnp.where(logits < _top_p_cutoff(sorted_logits, top_p), -jnp.inf, logits)


def _top_p_cutoff(sorted_logits, top_p):
    """The logit of the last token needed to reach top_p, from logits sorted high to low."""
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    index = jnp.minimum(jnp.sum(cum < top_p, axis=-1, keepdims=True), sorted_logits.shape[-1] - 1)
    return jnp.take_along_axis(sorted_logits, index, axis=-1)


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k (0: off), then top-p over what top-k kept (1.0: off), as HF orders them."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    vocab = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    rank = jnp.arange(vocab)
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)), axis=-1)
    cutoff = jnp.where(top_p < 1.0, jnp.maximum(kth, _top_p_cutoff(sorted_logits, top_p)), kth)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def pick(logits, keys, temperature, top_k, top_p):
    """logits [b, vocab] fp32, keys () -> [b, 2] (one stream per row, derived only when sampling:
    greedy decoding skips the per-row key derivation) -> token ids [b] int32."""

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys(), filtered).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy)
