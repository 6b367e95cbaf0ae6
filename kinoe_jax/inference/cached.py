"""The model's forward against a KV cache laid out for decoding, one layer at a time.

The Flax model (kinoe_jax/models) keeps its cache as a variable of the scanned layer stack, in
the training layout [layers, batch, length, kv_heads, head_dim]. Inside a decode loop that
costs, per generated token: the scan slices each layer's cache out and stacks the updated one
into a new buffer (the whole cache copied), and attention transposes every layer's keys and
values to [batch, kv_heads, length, head_dim] (copied again); the scan also slices each
layer's weights out of the stacked parameters (measured on tiny_ja: 70 copies in the compiled
decode program). Here:

- each layer's keys and values are their own arrays, already [batch, kv_heads, slots, head_dim],
  so writing a token is a dynamic_update_slice of a while-loop carry (XLA updates it in place)
  and attention reads them as they lie;
- the per-layer weights are sliced from the stacked parameters once per program call, outside
  the decode loop (one transient copy of the layer weights instead of one per token);
- the arithmetic is the model's own: its RMSNorm, Proj, MLP and MoeBlock modules are applied
  to the layer's parameters, and prefill attends with the model's causal_attention, so only
  the wiring of a layer and the attention against the cache are written here.

Slots: prompts are left-padded into [0, bucket); row r's first real slot is `start[r]`; the
token fed at a decode step is written at `index`, shared by all rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kinoe_jax.models.attention import MASK_VALUE, causal_attention
from kinoe_jax.models.layers import MLP, Proj, RMSNorm, rotary


def layer_params(cfg, params) -> list:
    """[(use_moe, params of one DecoderLayer)] in layer order, whatever the stack's layout."""
    period = cfg.moe_layer_period if cfg.num_experts else 1
    layers = []
    for g in range(cfg.num_layers // period):
        group = jax.tree.map(lambda a, g=g: a[g], params["layers"]) if cfg.scan_layers else params[f"layers_{g}"]
        for j in range(period):
            layers.append((cfg.is_moe_layer(j), group["layer"] if period == 1 else group[f"sub_{j}"]))
    return layers


def empty_cache(cfg, rows: int, slots: int) -> dict:
    shape = (rows, cfg.num_kv_heads, slots, cfg.dim_per_head)
    zeros = [jnp.zeros(shape, cfg.compute_dtype) for _ in range(cfg.num_layers)]
    return {"k": zeros, "v": list(zeros)}


def _proj(cfg, features, axes, name, p, x, contract=1):
    return Proj(features, axes, cfg, contract=contract, name=name).apply({"params": p[name]}, x)


def _qkv(cfg, p, h, positions):
    nh, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    q = _proj(cfg, (nh, d), ("embed", "heads", "head_dim"), "q_proj", p, h)
    k = _proj(cfg, (kv, d), ("embed", "kv_heads", "head_dim"), "k_proj", p, h)
    v = _proj(cfg, (kv, d), ("embed", "kv_heads", "head_dim"), "v_proj", p, h)
    return rotary(q, positions, cfg.rotary_dim, cfg.rope_theta), rotary(k, positions, cfg.rotary_dim,
                                                                        cfg.rope_theta), v


def _attend_cache(cfg, q, ck, cv, start, index):
    """One query per row [b, 1, h, d] against slots [start, index] of ck, cv [b, kv, slots, d]."""
    b, _, nh, d = q.shape
    kv, slots = ck.shape[1], ck.shape[2]
    qg = (q * d ** -0.5).reshape(b, kv, nh // kv, d)  # head kv*g + i is query i of kv head kv
    logits = jnp.einsum("bkgd,bksd->bkgs", qg, ck, preferred_element_type=jnp.float32)
    slot = jnp.arange(slots)[None, :]
    visible = (slot >= start[:, None]) & (slot <= index)
    if cfg.sliding_window is not None:
        visible &= index - slot < cfg.sliding_window
    logits = jnp.where(visible[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(cv.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, cv)
    return out.reshape(b, 1, nh, d)


def _layer(cfg, use_moe, p, x, segments, attention):
    h = RMSNorm(cfg).apply({"params": p["attn_norm"]}, x)
    out = attention(h)
    x = x + _proj(cfg, (cfg.hidden_size,), ("heads", "head_dim", "embed"), "o_proj", p["attn"], out, contract=2)
    h = RMSNorm(cfg).apply({"params": p["mlp_norm"]}, x)
    if use_moe:  # MoE is optional: dense models never import it
        from kinoe_jax.models.moe import MoeBlock

        out, _ = MoeBlock(cfg).apply({"params": p["moe"]}, h, segments)
    else:
        out = MLP(cfg).apply({"params": p["mlp"]}, h)
    return x + out


def _embed(cfg, params, tokens):
    return jnp.take(params["embed"]["embedding"].astype(cfg.compute_dtype), tokens, axis=0)


def _logits(cfg, params, x):
    """fp32 logits of x [b, 1, embed] (the last position only: nothing else is sampled)."""
    x = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    if cfg.tie_embeddings:
        table = params["embed"]["embedding"].astype(cfg.compute_dtype)
        return jnp.einsum("bte,ve->btv", x, table).astype(jnp.float32)
    return _proj(cfg, (cfg.vocab_size,), ("embed", "vocab"), "lm_head", params, x).astype(jnp.float32)


def prefill(cfg, params, layers, cache, tokens, positions, segments):
    """Left-padded prompts [b, bucket] -> (last-position logits [b, 1, vocab], cache with slots
    [0, bucket) written)."""
    x = _embed(cfg, params, tokens)
    ks, vs = [], []
    for i, (use_moe, p) in enumerate(layers):
        def attention(h, p=p, i=i):
            q, k, v = _qkv(cfg, p["attn"], h, positions)
            ks.append(jax.lax.dynamic_update_slice(cache["k"][i], k.transpose(0, 2, 1, 3), (0, 0, 0, 0)))
            vs.append(jax.lax.dynamic_update_slice(cache["v"][i], v.transpose(0, 2, 1, 3), (0, 0, 0, 0)))
            return causal_attention(q, k, v, segments, cfg.sliding_window, cfg.attention_chunk)

        x = _layer(cfg, use_moe, p, x, segments, attention)
    return _logits(cfg, params, x[:, -1:]), {"k": ks, "v": vs}


def step(cfg, params, layers, cache, token, pos, valid, start, index):
    """One token per row [b] at positions pos [b], written at slot `index` -> (logits [b, 1, vocab],
    cache)."""
    x = _embed(cfg, params, token[:, None])
    segments = valid[:, None]
    ks, vs = [], []
    for i, (use_moe, p) in enumerate(layers):
        def attention(h, p=p, i=i):
            q, k, v = _qkv(cfg, p["attn"], h, pos[:, None])
            ck = jax.lax.dynamic_update_slice(cache["k"][i], k.transpose(0, 2, 1, 3), (0, 0, index, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"][i], v.transpose(0, 2, 1, 3), (0, 0, index, 0))
            ks.append(ck)
            vs.append(cv)
            return _attend_cache(cfg, q, ck, cv, start, index)

        x = _layer(cfg, use_moe, p, x, segments, attention)
    return _logits(cfg, params, x), {"k": ks, "v": vs}
