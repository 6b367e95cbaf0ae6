"""The Mistral/Mixtral decoder: embedding, a scanned stack of pre-norm layers, norm, LM head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kinoe_jax.models.attention import RESIDUAL_NAMES
from kinoe_jax.models.config import ModelConfig
from kinoe_jax.models.layers import LORA_OUTPUT, MLP, QKVO_NAMES, Attention, RMSNorm, _init
from kinoe_jax.models.lm_head import LMHead, target_logps
from kinoe_jax.models.moe import MoeBlock

_policies = jax.checkpoint_policies
# The dots policies also keep attention's own small residuals (output and log-sum-exp), and a
# LoRA-adapted projection's output: it is a sum, not a dot, so the dots policies alone would
# recompute the frozen projection in the backward pass (measured: LoRA's step 1.06x full
# fine-tuning's speed instead of faster).
_ATTENTION = _policies.save_only_these_names(*RESIDUAL_NAMES, LORA_OUTPUT)
LAYER_INPUT = "decoder_layer_input"
# MaxText's host-offloading recipe (its v6e Llama 3.1 8B "custom" remat): the layer input and
# the q/k/v/o projections go to host memory in the forward pass and come back for the
# backward; attention's small residuals stay on the device; everything else is recomputed
# (offload) or kept as the dots_no_batch policy keeps it (offload_dots_no_batch).
_OFFLOAD = _policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[*RESIDUAL_NAMES, LORA_OUTPUT], names_which_can_be_offloaded=[LAYER_INPUT, *QKVO_NAMES],
    offload_src="device", offload_dst="pinned_host")
_RECOMPUTE = _OFFLOAD(jax.lax.add_p)  # the offload policy's answer for anything it does not name


def _offload_or_keep_dots(prim, *args, **params):
    # The offload policy answers saveable / offloadable / recompute, which save_from_both_policies
    # refuses to combine: where it would recompute, the dots_no_batch rule decides.
    out = _OFFLOAD(prim, *args, **params)
    return _policies.dots_with_no_batch_dims_saveable(prim, *args, **params) if out is _RECOMPUTE else out


REMAT = {
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots, _ATTENTION),
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable, _ATTENTION),
    "offload": _OFFLOAD,
    "offload_dots_no_batch": _offload_or_keep_dots,
}


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    use_moe: bool = False
    decode: bool = False
    lora_enabled: bool = True

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.cfg
        x = checkpoint_name(x, LAYER_INPUT)
        h = RMSNorm(cfg, name="attn_norm")(x)
        attn = Attention(cfg, decode=self.decode, lora_enabled=self.lora_enabled, name="attn")
        x = x + attn(h, positions, segment_ids)
        h = RMSNorm(cfg, name="mlp_norm")(x)
        if self.use_moe:
            out, aux = MoeBlock(cfg, name="moe")(h, segment_ids)
        else:
            out, aux = MLP(cfg, lora_enabled=self.lora_enabled, name="mlp")(h), {}
        x = nn.with_logical_constraint(x + out, ("batch", "activation_length", "activation_embed"))
        return x, aux


class LayerGroup(nn.Module):
    """`moe_layer_period` consecutive layers: the unit that is scanned, so interleaved
    dense/MoE designs still scan (period 1, the usual case, is a single layer)."""

    cfg: ModelConfig
    decode: bool = False
    lora_enabled: bool = True

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.cfg
        period = cfg.moe_layer_period if cfg.num_experts else 1
        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(DecoderLayer, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if period == 1:
            return layer_cls(cfg, use_moe=cfg.is_moe_layer(0), decode=self.decode, lora_enabled=self.lora_enabled,
                             name="layer")(x, positions, segment_ids)
        aux = {}
        for j in range(period):
            x, a = layer_cls(cfg, use_moe=cfg.is_moe_layer(j), decode=self.decode, lora_enabled=self.lora_enabled,
                             name=f"sub_{j}")(x, positions, segment_ids)
            aux.update(a)
        return x, aux


class Transformer(nn.Module):
    """tokens [batch, length] -> (logits [batch, length, vocab] fp32, aux dict of per-layer stats).

    With `targets` [batch, length] it returns (log p(target) [batch, length] fp32, aux) instead,
    without holding all the logits when ModelConfig.lm_head_chunk > 0 (the training losses).
    lora_enabled=False computes the base model from the same params (adapters left unread).
    """

    cfg: ModelConfig
    decode: bool = False
    lora_enabled: bool = True

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, targets=None):
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1])[None], tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                         embedding_init=_init(cfg, ("vocab", "embed")), name="embed")
        x = embed(tokens)
        x = nn.with_logical_constraint(x, ("batch", "activation_length", "activation_embed"))

        period = cfg.moe_layer_period if cfg.num_experts else 1
        n_groups = cfg.num_layers // period
        if cfg.scan_layers:
            stack = nn.scan(
                LayerGroup,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},  # each layer its own LoRA dropout mask
                in_axes=(nn.broadcast, nn.broadcast),
                length=n_groups,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, decode=self.decode, lora_enabled=self.lora_enabled, name="layers")
            x, aux = stack(x, positions, segment_ids)
        else:
            auxes = []
            for i in range(n_groups):
                x, a = LayerGroup(cfg, decode=self.decode, lora_enabled=self.lora_enabled, name=f"layers_{i}")(
                    x, positions, segment_ids)
                auxes.append(a)
            aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes and auxes[0] else {}

        x = RMSNorm(cfg, name="final_norm")(x)
        head = None if cfg.tie_embeddings else LMHead(cfg, name="lm_head")
        if targets is not None and cfg.lm_head_chunk:
            if head is None:
                return target_logps(x, embed.embedding.T, targets, cfg.lm_head_chunk, cfg.compute_dtype), aux
            return head(x, targets), aux
        logits = embed.attend(x) if head is None else head(x)
        logits = nn.with_logical_constraint(logits, ("batch", "activation_length", "activation_vocab"))
        logits = logits.astype(jnp.float32)
        if targets is not None:
            logits = jax.nn.log_softmax(logits)
            return jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0], aux
        return logits, aux
