"""Splash attention (the TPU kernel) in Pallas interpret mode against the reference attention,
split over a mesh, under remat, and compiled for a real TPU slice by libtpu's compiler."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models.attention import attend, attention_mask
from kinoe_jax.models.attention.splash import block_sizes_for, splash_attention
from kinoe_jax.parallel import rules as R

T = 256


def _inputs(b=2, t=T, h=4, kv=2, d=32, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
    # Two packed documents, the second crossing the 128-token block edge, then padding.
    seg = jnp.asarray(np.repeat(np.array([[1] * 100 + [2] * 130 + [0] * (t - 230)]), b, axis=0))
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) * (seg > 0)[..., None, None]
    return q, k, v, seg, w


def _reference_grads(q, k, v, seg, w, window):
    idx = jnp.broadcast_to(jnp.arange(q.shape[1])[None], seg.shape)
    mask = attention_mask(idx, idx, seg, seg, window)
    return jax.value_and_grad(lambda q, k, v: jnp.sum(w * attend(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, ref, atol):
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for name, a, b in zip("qkv", got[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("window", [None, 64])
def test_packed_gqa_values_and_gradients_match_the_reference(window):
    q, k, v, seg, w = _inputs()
    got = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(w * splash_attention(q, k, v, seg, window, 128, 128)),
                                     argnums=(0, 1, 2)))(q, k, v)
    _assert_close(got, _reference_grads(q, k, v, seg, w, window), atol=2e-5)


def test_bfloat16_keeps_its_dtype_and_stays_close():
    q, k, v, seg, _ = _inputs(dtype=jnp.bfloat16)
    out = splash_attention(q, k, v, seg, 64, 128, 128)
    assert out.dtype == jnp.bfloat16
    ref = splash_attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg, 64, 128, 128)
    real = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out, np.float32)[real], np.asarray(ref)[real], atol=3e-2)


# Heads over 'tensor' (the table's rule), then the query sequence over 'tensor' instead.
SEQUENCE_RULES = (("activation_length", "tensor"),) + R.LOGICAL_AXIS_RULES


@pytest.mark.parametrize("rules, inner_q", [(R.LOGICAL_AXIS_RULES, (1, T, 2, 32)),
                                            (SEQUENCE_RULES, (1, T // 2, 4, 32))])
def test_on_a_data_fsdp_tensor_mesh(rules, inner_q):
    from kinoe_jax.parallel.mesh import make_mesh

    q, k, v, seg, w = _inputs(b=4)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)

    def loss(q, k, v):
        return jnp.sum(w * splash_attention(q, k, v, seg, 64, 128, 128, rules=rules))

    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(loss)(q, k, v)
        shard_maps = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
        assert [x.aval.shape for x in shard_maps[0].params["jaxpr"].invars[:3]] == [
            inner_q, (1, T, inner_q[2] // 2, 32), (1, T, inner_q[2] // 2, 32)]
        qs = jax.device_put(q, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(qs, k, v)
    _assert_close(got, _reference_grads(q, k, v, seg, w, 64), atol=2e-5)


def test_block_sizes_that_do_not_tile_the_sequence_are_named():
    assert block_sizes_for(4096, 512, 1024) == (512, 1024)
    assert block_sizes_for(256, 512, 512) == (256, 256)  # capped at the sequence
    with pytest.raises(ValueError, match="attention_block_kv = 256 does not tile sequence length 384"):
        block_sizes_for(384, 128, 256)
    with pytest.raises(ValueError, match="multiple of 128, got 200"):
        block_sizes_for(200, 128, 128)
    with pytest.raises(ValueError, match="attention_block_q 100 must be a positive multiple of 128"):
        ModelConfig(attention_block_q=100)
    with pytest.raises(ValueError, match="attention_impl 'flash' not one of"):
        ModelConfig(attention_impl="flash")


def test_remat_keeps_the_kernel_residuals(capsys):
    """Under dots_no_batch the kernel's output and log-sum-exp are saved across the layer scan,
    so the backward pass does not rerun the forward kernel."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=128, remat_policy="dots_no_batch", attention_impl="splash")
    model = Transformer(cfg)
    tokens = jnp.ones((2, 128), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(lambda p: jnp.mean(model.apply({"params": p}, tokens)[0]), params)
    saved = capsys.readouterr().out
    # [layers, batch, heads, t, head_dim] and [layers, batch, heads, t].
    assert "f32[2,2,4,128,16] output of scan" in saved, saved
    assert "f32[2,2,4,128] output of scan" in saved, saved


@pytest.mark.slow
def test_training_step_compiles_for_a_v5p_slice():
    """The whole step with splash, on libtpu's compiler for 8 v5p chips (data, fsdp, tensor = 2)."""
    from kinoe_jax.hardware import chips
    from kinoe_jax.planning.fit import compile_train_step
    from kinoe_jax.parallel.mesh import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=chips.target("v5p-16").devices())
    cfg = ModelConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=128, max_seq_len=T, sliding_window=128, dtype="bfloat16",
                      remat_policy="dots_no_batch", attention_impl="auto")
    compiled, _ = compile_train_step(cfg, mesh, T, 8, 1, False)
    text = compiled.as_text()
    # Forward and the fused backward are Mosaic kernels; no [t, t] logits are materialised.
    assert len(re.findall(r'custom_call_target="tpu_custom_call"', text)) >= 2
    assert not re.search(rf"\[\d+,\d+,{T},{T}\]", text)
    assert compiled.memory_analysis().temp_size_in_bytes > 0
