"""The training attention's own VJP against autodiff of plain masked softmax attention."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models.attention import RESIDUAL_NAMES, attend, attention_mask, causal_attention


def _inputs(b=2, t=32, h=4, kv=2, d=8, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
    # Two packed documents and trailing padding in every row.
    seg = jnp.asarray(np.repeat(np.array([[1] * 12 + [2] * 15 + [0] * 5]), b, axis=0))
    # A cotangent that is zero on padding rows, as the loss weights make it in training.
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) * (seg > 0)[..., None, None]
    return q, k, v, seg, w


@pytest.mark.parametrize("window,chunk", [(None, 0), (None, 8), (5, 8), (11, 16)])
def test_values_and_gradients_equal_plain_attention(window, chunk):
    q, k, v, seg, w = _inputs()
    idx = jnp.broadcast_to(jnp.arange(q.shape[1])[None], seg.shape)
    mask = attention_mask(idx, idx, seg, seg, window)

    def reference(q, k, v):
        return jnp.sum(w * attend(q, k, v, mask))

    def blocked(q, k, v):
        return jnp.sum(w * causal_attention(q, k, v, seg, window, chunk))

    ref_val, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(q, k, v)
    val, grads = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for name, a, b in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d{name}")


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, seg, w = _inputs(dtype=jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, seg, None, 8), q, k, v)
    grads = vjp(w.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    ref = causal_attention(q32, k32, v32, seg, None, 8)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_remat_keeps_the_attention_residuals(capsys):
    """Under the dots policies the backward must not rerun the attention forward: its output
    and per-block log-sum-exp are saved (by name) and carried out of the layer scan."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=32, remat_policy="dots_no_batch", attention_chunk=8)
    model = Transformer(cfg)
    tokens = jnp.ones((2, 32), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])

    def loss(p):
        return jnp.mean(model.apply({"params": p}, tokens)[0])

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, params)
    saved = capsys.readouterr().out
    # [layers, batch, kv heads, group * chunk, 1] per query block, [layers, batch, t, heads, d] once.
    assert saved.count("f32[2,2,2,16,1] output of scan") == 32 // 8, saved
    assert "f32[2,2,32,4,8] output of scan" in saved, saved
    assert RESIDUAL_NAMES[:2] == ("attention_out", "attention_lse")
    plain = Transformer(dataclasses.replace(cfg, remat_policy="none"))
    g1 = jax.grad(loss)(params)
    g2 = jax.grad(lambda p: jnp.mean(plain.apply({"params": p}, tokens)[0]))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)
