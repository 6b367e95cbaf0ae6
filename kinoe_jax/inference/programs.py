"""The three jitted programs of the engine: prefill, the decode loop, and packed log-likelihoods.

Decoding runs as a `lax.while_loop` on the device: one dispatch per call instead of one per
token. The loop stops when every row is done or at `limit`, a traced scalar, so the host can
take control back every few tokens to look for stop strings without a recompile.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kinoe_jax.inference import cached
from kinoe_jax.inference.sampling import pick
from kinoe_jax.models import Transformer

MAX_STOP_IDS = 16  # the stop-id set is a fixed-size operand (-1 pads it), so it never recompiles


def _keys(seed, row_ids, step):
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(row_ids)


def _pick(logits, seed, row_ids, step, sampling):
    temperature, top_k, top_p = sampling
    return pick(logits, lambda: _keys(seed, row_ids, step), temperature, top_k, top_p)


def _is_stop(tokens, stop_ids):
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def decode_config(cfg, cache_len: int):
    """The model as the decoder runs it: a cache of cache_len slots, no rematerialisation."""
    return dataclasses.replace(cfg, max_seq_len=cache_len, remat_policy="none")


def make_prefill(cfg, cache_len: int):
    """(params, batch arrays, sampling) -> decode state after the first new token (the buffer of
    new tokens is cache_len wide, so the decode program depends on cache_len alone)."""
    cfg = decode_config(cfg, cache_len)

    def prefill(params, tokens, positions, segments, lengths, row_ids, valid, seed, sampling, stop_ids):
        rows, bucket = tokens.shape
        layers = cached.layer_params(cfg, params)
        logits, cache = cached.prefill(cfg, params, layers, cached.empty_cache(cfg, rows, cache_len), tokens,
                                       positions, segments)
        token = _pick(logits[:, -1], seed, row_ids, 0, sampling)
        out = jnp.zeros((rows, cache_len), jnp.int32).at[:, 0].set(token)
        return {"cache": cache, "token": token, "pos": lengths, "start": bucket - lengths, "index": jnp.int32(bucket),
                "out": out, "done": (valid == 0) | _is_stop(token, stop_ids), "n": jnp.int32(1)}

    return prefill


def make_decode(cfg, cache_len: int):
    """(params, state, ..., limit) -> state with tokens generated until every row is done or n == limit."""
    cfg = decode_config(cfg, cache_len)

    def decode(params, state, row_ids, valid, seed, sampling, stop_ids, limit):
        layers = cached.layer_params(cfg, params)  # sliced once per call, not once per token

        def cond(s):
            return (s["n"] < limit) & ~jnp.all(s["done"])

        def body(s):
            logits, cache = cached.step(cfg, params, layers, s["cache"], s["token"], s["pos"], valid, s["start"],
                                        s["index"])
            token = jnp.where(s["done"], 0, _pick(logits[:, -1], seed, row_ids, s["n"], sampling))
            out = jax.lax.dynamic_update_slice(s["out"], token[:, None], (0, s["n"]))
            return {**s, "cache": cache, "token": token, "pos": s["pos"] + 1, "index": s["index"] + 1, "out": out,
                    "done": s["done"] | _is_stop(token, stop_ids), "n": s["n"] + 1}

        return jax.lax.while_loop(cond, body, state)

    return decode


def make_token_logprobs(cfg):
    """Packed rows -> (log p(target) [rows, length], target is the argmax [rows, length])."""
    model = Transformer(dataclasses.replace(cfg, remat_policy="none"))

    def token_logprobs(params, inputs, targets, positions, segments):
        logits, _ = model.apply({"params": params}, inputs, positions, segments)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return logprob, jnp.argmax(logits, axis=-1) == targets

    return token_logprobs
