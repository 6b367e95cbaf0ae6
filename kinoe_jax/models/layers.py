"""Building blocks of the Mistral decoder: RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Every parameter is declared with logical axis names; kinoe_jax/parallel/rules.py alone decides
how those names map onto the device mesh.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kinoe_jax.models import lora as lora_lib
from kinoe_jax.models import quant
from kinoe_jax.models.attention import attend, attention_mask, causal_attention, training_attention
from kinoe_jax.models.config import ModelConfig


# The remat name of an adapted projection's output (decoder.REMAT's dots policies keep it).
LORA_OUTPUT = "lora_output"
# Remat names of attention's projections (the offload policies move them to host memory).
QKVO_NAMES = ("query_proj", "key_proj", "value_proj", "out_proj")


def _init(cfg: ModelConfig, axes):
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


class Proj(nn.Module):
    """A bias-free projection contracting the last `contract` dims of x into `features`.

    Written out (rather than nn.DenseGeneral) so the kernel keeps its full logical shape, e.g.
    q_proj [embed, heads, head_dim], which is also the HF weight reshaped without surprises.

    The product itself is one 2-D matmul [tokens, in] @ [in, out]: differentiating a 3-D
    tensordot makes the weight gradient contract over (batch, length), and XLA:CPU then
    transposes the whole activation gradient first (measured: the SwiGLU MLP's fwd+bwd took
    1.8x longer). Merging the leading dims is free under the sharding rules (batch is the
    major dim; length and the merged feature dims keep their order).

    A projection whose module name is one of `cfg.lora.targets` also carries a LoRA adapter
    (kinoe_jax/models/lora.py) unless `lora_enabled` is False: then the same params tree
    computes the base model exactly (DPO's reference), the adapter leaves left unread.
    """

    features: tuple
    axes: tuple
    cfg: ModelConfig
    contract: int = 1
    lora_enabled: bool = True

    @nn.compact
    def __call__(self, x):
        shape = tuple(x.shape[-self.contract:]) + tuple(self.features)
        kernel = self.param("kernel", _init(self.cfg, self.axes), shape, jnp.float32)
        dtype = self.cfg.compute_dtype
        lead = x.shape[:-self.contract]
        n_in, n_out = math.prod(shape[:self.contract]), math.prod(self.features)
        x2 = x.astype(dtype).reshape(-1, n_in)
        quant.check_mode(self.cfg.matmul_dtype)
        y = quant.matmul(x2, kernel.astype(dtype).reshape(n_in, n_out), self.cfg.matmul_dtype)
        lora = self.cfg.lora
        if self.lora_enabled and lora is not None and self.name in lora.targets:
            y = checkpoint_name(y + self._adapter(x2, shape, lora), LORA_OUTPUT)
        return y.reshape(*lead, *self.features)

    def _adapter(self, x2, shape, lora):
        c, rank, r_axis = self.contract, lora.rank, lora_lib.RANK_AXIS
        n_in = x2.shape[-1]
        a = self.param("lora_a", nn.with_logical_partitioning(lora_lib.a_init(n_in), self.axes[:c] + (r_axis,)),
                       shape[:c] + (rank,), jnp.float32)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (r_axis,) + self.axes[c:]),
                       (rank,) + shape[c:], jnp.float32)
        # Dropout only in training (a "dropout" rng given): evaluation and generation stay exact.
        if lora.dropout and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - lora.dropout, x2.shape)
            x2 = jnp.where(keep, x2 / (1.0 - lora.dropout), 0).astype(x2.dtype)
        return lora_lib.adapted(x2, a.reshape(n_in, rank), b.reshape(rank, -1), lora.scale, x2.dtype)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (y * scale).astype(self.cfg.compute_dtype)


def rotary(x, positions, rotary_dim: int, theta: float):
    """Half-split rotary (as HF Mistral/Llama) on the first `rotary_dim` dims of each head.

    x: [batch, length, heads, head_dim]; positions: [batch, length] (restart per packed segment).
    """
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = (rot.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


class Attention(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    lora_enabled: bool = True

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.cfg
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        on = self.lora_enabled
        q = Proj((h, d), ("embed", "heads", "head_dim"), cfg, lora_enabled=on, name="q_proj")(x)
        k = Proj((kv, d), ("embed", "kv_heads", "head_dim"), cfg, lora_enabled=on, name="k_proj")(x)
        v = Proj((kv, d), ("embed", "kv_heads", "head_dim"), cfg, lora_enabled=on, name="v_proj")(x)
        q, k, v = (checkpoint_name(a, n) for a, n in zip((q, k, v), QKVO_NAMES))
        q = rotary(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = rotary(k, positions, cfg.rotary_dim, cfg.rope_theta)

        if self.decode:
            # A prompt filling an empty cache attends only to itself, blocked as in training:
            # masking it against the whole cache would hold [prompt, prompt + new tokens] logits.
            prefill = not self.has_variable("cache", "cached_key")
            ck, cv, q_idx, k_idx, q_seg, k_seg = self._update_cache(k, v, segment_ids)
            out = (causal_attention(q, k, v, segment_ids, cfg.sliding_window, cfg.attention_chunk) if prefill
                   else attend(q, ck, cv, attention_mask(q_idx, k_idx, q_seg, k_seg, cfg.sliding_window)))
        else:
            out = training_attention(q, k, v, segment_ids, cfg)  # the kernel for the mesh's platform
        out = Proj((cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg, contract=2, lora_enabled=self.lora_enabled,
                   name="o_proj")(out)
        return checkpoint_name(out, QKVO_NAMES[3])

    def _update_cache(self, k, v, segment_ids):
        """Append this call's keys/values at cache_index (prefill: many tokens, decode: one)."""
        b, t, kv, d = k.shape
        max_len = self.cfg.max_seq_len
        ck = self.variable("cache", "cached_key", jnp.zeros, (b, max_len, kv, d), k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (b, max_len, kv, d), v.dtype)
        cs = self.variable("cache", "cached_segment", jnp.zeros, (b, max_len), jnp.int32)
        idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
        cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids.astype(jnp.int32), (0, i))
        idx.value = i + t
        q_idx = jnp.broadcast_to(i + jnp.arange(t)[None], (b, t))
        k_idx = jnp.broadcast_to(jnp.arange(max_len)[None], (b, max_len))
        return ck.value, cv.value, q_idx, k_idx, segment_ids, cs.value


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig
    lora_enabled: bool = True

    @nn.compact
    def __call__(self, x):
        cfg, on = self.cfg, self.lora_enabled
        gate = Proj((cfg.intermediate_size,), ("embed", "mlp"), cfg, lora_enabled=on, name="gate_proj")(x)
        up = Proj((cfg.intermediate_size,), ("embed", "mlp"), cfg, lora_enabled=on, name="up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "activation_length", "activation_mlp"))
        return Proj((cfg.hidden_size,), ("mlp", "embed"), cfg, lora_enabled=on, name="down_proj")(hidden)
