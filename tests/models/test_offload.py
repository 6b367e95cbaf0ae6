"""Remat that offloads to host memory: the same gradients, and host transfers in the TPU program;
splash's backward tiles."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.hardware import chips
from kinoe_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=64, init_std=0.2)


def _grads(cfg, params, tokens):
    def loss(p):
        logp, _ = Transformer(cfg).apply({"params": p}, tokens, None, None, jnp.roll(tokens, -1, axis=1))
        return -jnp.mean(logp)

    return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("policy", ["offload", "offload_dots_no_batch"])
def test_offload_policies_keep_the_gradients(policy):
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, CFG.vocab_size)
    params = nn.meta.unbox(Transformer(CFG).init(jax.random.PRNGKey(1), tokens)["params"])
    ref = _grads(dataclasses.replace(CFG, remat_policy="full"), params, tokens)
    got = _grads(dataclasses.replace(CFG, remat_policy=policy), params, tokens)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_offload_moves_activations_to_host_memory_on_tpu():
    """libtpu's program for the offload policy copies to and from host memory (memory space 5);
    the full policy's does not."""
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.planning.fit import compile_train_step

    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=chips.target("v5p-8").devices())
    texts = {}
    for policy in ("full", "offload"):
        cfg = dataclasses.replace(CFG, remat_policy=policy, hidden_size=256, num_heads=4, max_seq_len=256,
                                  dtype="bfloat16", attention_impl="blocked")
        compiled, _ = compile_train_step(cfg, mesh, 256, 8, 1, False)
        texts[policy] = compiled.as_text()
    assert "S(5)" in texts["offload"] and "S(5)" not in texts["full"]


def test_splash_backward_tiles_are_settable():
    from kinoe_jax.models.attention import splash

    kernel = splash.make_kernel(512, 2, None, 256, 256, 1, 1, True, block_q_dkv=128, block_kv_dkv=512)
    sizes = kernel.kwargs["block_sizes"]
    assert (sizes.block_q, sizes.block_q_dkv, sizes.block_kv_dkv) == (256, 128, 512)
    with pytest.raises(ValueError, match="attention_block_q_dkv 100 must be 0"):
        ModelConfig(attention_block_q_dkv=100)
