"""Low-precision matmuls: numerics on the CPU (emulated), refusal where a chip lacks a mode,
real fp8 / int8 GEMMs in the H100 and TPU compilers' programs, and fp32 master weights."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.hardware import chips
from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models import quant
from kinoe_jax.utils.errors import ConfigError

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_seq_len=64, init_std=0.1, dtype="bfloat16")


def _loss_grads(cfg, params, tokens):
    def loss(p):
        logp, _ = Transformer(cfg).apply({"params": p}, tokens, None, None, jnp.roll(tokens, -1, axis=1))
        return -jnp.mean(logp)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_low_precision_tracks_the_default_and_keeps_fp32_weights(mode):
    tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 32), 0, CFG.vocab_size)
    params = nn.meta.unbox(Transformer(CFG).init(jax.random.PRNGKey(1), tokens)["params"])
    ref_loss, ref_grads = _loss_grads(CFG, params, tokens)
    loss, grads = _loss_grads(dataclasses.replace(CFG, matmul_dtype=mode), params, tokens)
    assert abs(float(loss) - float(ref_loss)) < 0.01 * float(ref_loss)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert g.dtype == jnp.float32, path  # gradients, like the master weights, stay fp32
        cos = float(jnp.vdot(g, r) / (jnp.linalg.norm(g) * jnp.linalg.norm(r) + 1e-30))
        assert cos > 0.97, (jax.tree_util.keystr(path), cos)
    # The low-precision model's parameters are the default model's: nothing quantized is stored.
    q_params = jax.eval_shape(lambda: Transformer(dataclasses.replace(CFG, matmul_dtype=mode)).init(
        jax.random.PRNGKey(1), tokens)["params"])
    assert jax.tree.structure(nn.meta.unbox(q_params)) == jax.tree.structure(params)
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(q_params))} == {jnp.dtype(jnp.float32)}


def test_unknown_mode_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"matmul_dtype 'fp4' not one of \('default', 'fp8', 'int8'\)"):
        ModelConfig(matmul_dtype="fp4")


@pytest.mark.parametrize("target,mode,ok", [("h100-8", "fp8", True), ("h100-8", "int8", False),
                                            ("v5p-8", "int8", True), ("v5p-8", "fp8", False),
                                            ("v6e-8", "int8", True), ("v4-8", "int8", False)])
def test_a_mode_the_chip_lacks_is_refused_before_compiling(target, mode, ok):
    mesh = jax.sharding.Mesh(np.array(chips.target(target).devices()), ("data",))
    cfg = dataclasses.replace(CFG, matmul_dtype=mode)
    tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    with jax.set_mesh(mesh):
        trace = lambda: jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.PRNGKey(0), t), tokens)  # noqa: E731
        if ok:
            trace()
        else:
            with pytest.raises(ConfigError, match=f"matmul_dtype '{mode}' is not supported on .*: it supports"):
                trace()


def test_where_offered_names_the_chips():
    assert quant.where_offered() == "fp8 on h100, h200; int8 on v5p, v5e, v6e"


@pytest.mark.slow
@pytest.mark.parametrize("target,mode,forward,backward", [("h100-8", "fp8", {"f8e4m3fn"}, {"f8e4m3fn", "f8e5m2"}),
                                                          ("v5p-8", "int8", {"s8"}, {"s8"})])
def test_the_chip_compiler_gets_low_precision_gemms(target, mode, forward, backward):
    """The training step compiled for the chip multiplies low-precision operands: the forward
    products (fp8: e4m3 x e4m3) and the gradient products (fp8: e5m2 gradients); the aot
    report's count finds them and prices them at the chip's low-precision peak."""
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.planning import hlo_stats
    from kinoe_jax.planning.fit import compile_train_step

    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=chips.target(target).devices())
    cfg = dataclasses.replace(CFG, matmul_dtype=mode, max_seq_len=256, attention_impl="blocked")
    compiled, _ = compile_train_step(cfg, mesh, 256, 8, 1, False)
    text = compiled.as_text()
    dtype_of = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", text))
    products = []
    for line in text.splitlines():
        m = re.search(r"= \S+ (?:dot|convolution)\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if m:
            products.append({dtype_of.get(m.group(1)), dtype_of.get(m.group(2))})
    low = [p for p in products if p <= backward]
    # The seven projections' forward and gradient products (XLA merges some: q/k/v, gate/up).
    assert len(low) >= 9 and forward in low and backward in low, products
    chip = chips.target(target).chip
    stats = hlo_stats.analyze(text, mesh.size, chip.peak_flops, chip.hbm_gbps * 1e9)
    # Both layers of the scan: its body's products counted once per layer.
    assert stats.low_precision_gemms[mode] >= 2 * len(low)
    assert 0 < stats.low_precision_flops[mode] < stats.matmul_flops


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_ragged_experts_in_low_precision_track_the_default(mode):
    from kinoe_jax.models import moe_kernels as K

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    rows = jax.random.normal(keys[0], (24, 32), jnp.bfloat16)
    wg, wu = (jax.random.normal(k, (3, 32, 48), jnp.float32) * 0.2 for k in keys[1:3])
    wo = jax.random.normal(keys[3], (3, 48, 32), jnp.float32) * 0.2
    sizes = jnp.array([10, 6, 8], jnp.int32)

    def loss(m):
        return lambda r, g, u, o: jnp.sum(K.ragged_ffn(r, sizes, g, u, o, m).astype(jnp.float32) ** 2)

    ref = jax.value_and_grad(loss("default"), argnums=(0, 1, 2, 3))(rows, wg, wu, wo)
    got = jax.value_and_grad(loss(mode), argnums=(0, 1, 2, 3))(rows, wg, wu, wo)
    assert abs(float(got[0]) - float(ref[0])) < 0.05 * float(ref[0])
    for g, r in zip(got[1], ref[1]):
        g, r = g.astype(jnp.float32), r.astype(jnp.float32)
        assert float(jnp.vdot(g, r) / (jnp.linalg.norm(g) * jnp.linalg.norm(r))) > 0.97
