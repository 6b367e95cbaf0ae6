"""The GPU attention: its argument mapping checked through XLA's path on the CPU, and the whole
step compiled by the CUDA compiler for 8 H100s with cuDNN's fused attention."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.models import ModelConfig
from kinoe_jax.models.attention import attend, attention_mask, choose
from kinoe_jax.models.attention.gpu import cudnn_attention


def _inputs(b=2, t=48, h=4, kv=2, d=16, dtype=jnp.float32):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in [(b, t, h, d), (b, t, kv, d), (b, t, kv, d)])
    seg = jnp.asarray(np.repeat(np.array([[1] * 20 + [2] * 22 + [0] * (t - 42)]), b, axis=0))
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) * (seg > 0)[..., None, None]
    return q, k, v, seg, w


@pytest.mark.parametrize("window", [None, 7, 48])
def test_xla_path_matches_the_reference_on_packed_gqa_rows(window):
    q, k, v, seg, w = _inputs()
    idx = jnp.broadcast_to(jnp.arange(q.shape[1])[None], seg.shape)
    mask = attention_mask(idx, idx, seg, seg, window)
    ref = jax.value_and_grad(lambda q, k, v: jnp.sum(w * attend(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(w * cudnn_attention(q, k, v, seg, window, implementation="xla")),
        argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for name, a, b in zip("qkv", got[1], ref[1]):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"d{name}")


def test_cudnn_refuses_float32_by_name():
    q, k, v, seg, _ = _inputs()
    with pytest.raises(ValueError, match="attention_impl 'cudnn' needs ModelConfig.dtype bfloat16"):
        cudnn_attention(q, k, v, seg)


def test_auto_chooses_by_platform():
    assert choose("auto", "tpu", 4096, jnp.bfloat16) == "splash"
    assert choose("auto", "tpu", 100, jnp.bfloat16) == "blocked"  # splash tiles are 128 tokens
    assert choose("auto", "gpu", 4096, jnp.bfloat16) == "cudnn"
    assert choose("auto", "gpu", 4096, jnp.float32) == "blocked"  # cuDNN has no fp32 attention
    assert choose("auto", "cpu", 4096, jnp.bfloat16) == "blocked"
    assert choose("splash", "cpu", 256, jnp.float32) == "splash"  # asked for: interpret mode


@pytest.mark.slow
def test_training_step_compiles_with_cudnn_for_8_h100s():
    from kinoe_jax.hardware import chips
    from kinoe_jax.planning.fit import compile_train_step
    from kinoe_jax.parallel.mesh import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=chips.target("h100-8").devices())
    cfg = ModelConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=64, max_seq_len=256, sliding_window=128, dtype="bfloat16",
                      remat_policy="dots_no_batch")
    compiled, _ = compile_train_step(cfg, mesh, 256, 8, 1, False)
    targets = set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))
    assert {"__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"} <= targets, targets
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_accelerator_benchmark_refuses_a_cpu():
    from tools.bench import bench_accelerator as bench

    with pytest.raises(SystemExit, match="measures a GPU or TPU, and JAX sees only 'cpu' devices"):
        bench.main(["--steps=1"])
    names = list(bench.variants("gpu", ModelConfig(hidden_size=2048, intermediate_size=5632, num_heads=16)))
    assert names == ["dense attention=cudnn", "dense attention=blocked", "moe8 top-2 moe_impl=ragged",
                     "moe8 top-2 moe_impl=blocks"]
    cfg = ModelConfig(hidden_size=2048, intermediate_size=5632, num_heads=16)
    low = {n: c.matmul_dtype for n, c in bench.variants("gpu", cfg, matmul_modes=("fp8",)).items()}
    assert low["dense matmul_dtype=fp8"] == low["moe8 top-2 moe_impl=ragged matmul_dtype=fp8"] == "fp8"
