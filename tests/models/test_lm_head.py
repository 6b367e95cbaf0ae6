"""The chunked LM head: the materialised head's loss and gradients, without all the logits."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models.lm_head import target_logps

CFG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_seq_len=64, init_std=0.2)


def _batch(b=2, t=40, vocab=300, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    tokens = jax.random.randint(k1, (b, t), 0, vocab)
    targets = jax.random.randint(k2, (b, t), 0, vocab)
    weights = (jnp.arange(t)[None] < jnp.array([[t], [t - 9]])).astype(jnp.float32)
    return tokens, targets, weights


def _loss_and_grads(cfg, params, tokens, targets, weights):
    model = Transformer(cfg)

    def loss(p):
        logp, _ = model.apply({"params": p}, tokens, None, None, targets)
        return -jnp.sum(logp * weights) / jnp.sum(weights)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_head_equals_the_materialised_one(tie):
    """Loss and every gradient match the full-logits head to 1e-5, with a ragged last chunk
    (40 positions in chunks of 16) and for a tied head."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    tokens, targets, weights = _batch()
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(1), tokens)["params"])
    ref_loss, ref_grads = _loss_and_grads(dataclasses.replace(cfg, lm_head_chunk=0), params, tokens, targets, weights)
    loss, grads = _loss_and_grads(dataclasses.replace(cfg, lm_head_chunk=16), params, tokens, targets, weights)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_reference_head_is_log_softmax_of_the_logits():
    """lm_head_chunk = 0 gives log_softmax(logits)[target]: the logits the model returns without
    targets (generation's) are the same head."""
    tokens, targets, _ = _batch()
    cfg = dataclasses.replace(CFG, lm_head_chunk=0)
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens)["params"])
    logits, _ = model.apply({"params": params}, tokens)
    logp, _ = model.apply({"params": params}, tokens, None, None, targets)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(logp, want, rtol=1e-6, atol=1e-6)


def test_chunked_program_holds_no_full_logits():
    """The compiled loss and gradient hold no [tokens, vocab] array: the largest temporary is a
    chunk's logits, a fraction of the full ones."""
    b, t, e, v, chunk = 4, 512, 64, 8192, 64
    h = jax.ShapeDtypeStruct((b, t, e), jnp.float32)
    w = jax.ShapeDtypeStruct((e, v), jnp.float32)
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temps(fn):
        grad = jax.jit(jax.grad(lambda h, w, y: jnp.sum(fn(h, w, y)), argnums=(0, 1)))
        return grad.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes

    full = temps(lambda h, w, y: jnp.take_along_axis(jax.nn.log_softmax(h @ w), y[..., None], -1))
    chunked = temps(lambda h, w, y: target_logps(h, w, y, chunk, jnp.float32))
    logits_bytes = b * t * v * 4
    assert full >= logits_bytes
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)
