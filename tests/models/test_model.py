"""Model semantics: packing isolation, sliding window, partial rotary, KV-cache decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models.attention import attention_mask
from kinoe_jax.models.layers import rotary

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_seq_len=32)


def _init(cfg, length=16):
    model = Transformer(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32))["params"]
    import flax.linen as nn

    return model, nn.meta.unbox(params)


def test_packed_segments_do_not_see_each_other():
    model, params = _init(CFG)
    rng = np.random.default_rng(0)
    a, b = rng.integers(4, 97, 7), rng.integers(4, 97, 9)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 7 + [2] * 9])
    pos = np.array([list(range(7)) + list(range(9))])
    logits_packed, _ = model.apply({"params": params}, packed, pos, seg)
    logits_a, _ = model.apply({"params": params}, a[None])
    logits_b, _ = model.apply({"params": params}, b[None])
    np.testing.assert_allclose(logits_packed[0, :7], logits_a[0], atol=1e-5)
    np.testing.assert_allclose(logits_packed[0, 7:], logits_b[0], atol=1e-5)


def test_padding_is_masked_and_finite():
    model, params = _init(CFG)
    tokens = np.array([[5, 6, 7, 0, 0]])
    seg = np.array([[1, 1, 1, 0, 0]])
    logits, _ = model.apply({"params": params}, tokens, np.array([[0, 1, 2, 0, 0]]), seg)
    assert np.all(np.isfinite(logits))
    ref, _ = model.apply({"params": params}, tokens[:, :3])
    np.testing.assert_allclose(logits[0, :3], ref[0], atol=1e-5)


def test_sliding_window_mask():
    idx = jnp.arange(6)[None]
    seg = jnp.ones((1, 6), jnp.int32)
    m = np.asarray(attention_mask(idx, idx, seg, seg, sliding_window=3))[0]
    for q in range(6):
        for k in range(6):
            assert m[q, k] == (k <= q and q - k < 3), (q, k)


def test_sliding_window_changes_far_context_only():
    cfg = dataclasses.replace(CFG, sliding_window=4)
    model, params = _init(cfg)
    tokens = np.arange(4, 16)[None]
    changed = tokens.copy()
    changed[0, 0] = 50  # outside every later window of size 4 once 2 layers deep? only position < 7 sees it
    out1, _ = model.apply({"params": params}, tokens)
    out2, _ = model.apply({"params": params}, changed)
    # With 2 layers, information travels at most 2 * (4 - 1) = 6 positions.
    np.testing.assert_allclose(out1[0, 7:], out2[0, 7:], atol=1e-6)
    assert not np.allclose(out1[0, 1], out2[0, 1])


def test_partial_rotary_leaves_tail_untouched():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    y = rotary(x, pos, rotary_dim=2, theta=10000.0)
    np.testing.assert_allclose(y[..., 2:], x[..., 2:])
    assert not np.allclose(y[0, 1:, :, :2], x[0, 1:, :, :2])
    np.testing.assert_allclose(y[0, 0], x[0, 0], atol=1e-6)  # position 0: no rotation
    # Rotation preserves norms of the rotated part.
    np.testing.assert_allclose(jnp.linalg.norm(y[..., :2], axis=-1), jnp.linalg.norm(x[..., :2], axis=-1), rtol=1e-5)


@pytest.mark.parametrize("window,scan", [(None, True), (3, False)])
def test_kv_cache_decoding_matches_full_forward(window, scan):
    from kinoe_jax.inference.texts import generate_ids

    cfg = dataclasses.replace(CFG, sliding_window=window, scan_layers=scan)
    model, params = _init(cfg)
    prompt = [3, 10, 20, 30, 40]
    new = generate_ids(cfg, params, prompt, max_new_tokens=6, stop_ids=())
    # Greedy decoding without a cache: re-run the whole sequence for every token.
    seq = list(prompt)
    for _ in range(6):
        logits, _ = model.apply({"params": params}, np.array([seq]))
        seq.append(int(np.argmax(logits[0, -1])))
    assert new == seq[len(prompt):]


def test_top_p_keeps_the_nucleus():
    from kinoe_jax.inference.sampling import filter_top_p as _filter_top_p

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(_filter_top_p(logits, 0.75)))[0]
    assert kept.tolist() == [True, True, False, False]


def test_flops_formula_matches_counted_params():
    model, params = _init(CFG)
    counted = sum(x.size for x in jax.tree.leaves(params))
    assert counted == CFG.num_params()


def test_bad_config_names_the_problem():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_attention_equals_one_block(window):
    cfg = dataclasses.replace(CFG, sliding_window=window, attention_chunk=0)
    model, params = _init(cfg, length=32)
    chunked = Transformer(dataclasses.replace(cfg, attention_chunk=8))
    rng = np.random.default_rng(3)
    tokens = rng.integers(4, 97, (2, 32))
    seg = np.repeat(np.array([[1] * 12 + [2] * 15 + [0] * 5]), 2, axis=0)
    pos = np.repeat(np.array([list(range(12)) + list(range(15)) + [0] * 5]), 2, axis=0)
    a, _ = model.apply({"params": params}, tokens, pos, seg)
    b, _ = chunked.apply({"params": params}, tokens, pos, seg)
    real = seg > 0  # fully masked padding rows average over whichever keys their block has
    np.testing.assert_allclose(a[real], b[real], atol=1e-5)


def _lowered_text(cfg):
    import optax

    from kinoe_jax.training.step import make_train_step

    model, params = _init(cfg)
    tx = optax.adamw(1e-3)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jnp.zeros((2,), jnp.uint32)}
    ones = jnp.ones((1, 2, 16), jnp.int32)
    batch = {"decoder_input_tokens": ones, "decoder_target_tokens": ones, "decoder_loss_weights": ones,
             "decoder_segment_ids": ones, "decoder_positions": ones}
    return jax.jit(make_train_step(model, tx, lambda s: 1e-3)).lower(state, batch).as_text()


def test_scanned_program_does_not_grow_with_depth():
    """Scanned layers compile once: the training step's program is the same size at 2 and 8
    layers (unrolled, it grows with every layer)."""
    import re

    def size(cfg):
        return len(re.sub(r"\d+", "", _lowered_text(cfg)))  # ignore the shapes' layer counts

    shallow, deep = size(CFG), size(dataclasses.replace(CFG, num_layers=8))
    assert deep == shallow
    unrolled = size(dataclasses.replace(CFG, num_layers=8, scan_layers=False))
    assert unrolled > 2 * shallow


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(policy):
    tokens = np.random.default_rng(0).integers(4, 97, (2, 16))

    def grads(cfg):
        model, params = _init(cfg)
        loss = lambda p: jnp.mean(model.apply({"params": p}, tokens)[0] ** 2)  # noqa: E731
        return jax.grad(loss)(params)

    ref = grads(CFG)
    got = grads(dataclasses.replace(CFG, remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), ref, got)


def test_bfloat16_compute_tracks_float32():
    tokens = np.random.default_rng(0).integers(4, 97, (2, 16))
    model, params = _init(CFG)
    ref, _ = model.apply({"params": params}, tokens)
    bf16 = Transformer(dataclasses.replace(CFG, dtype="bfloat16"))
    out, _ = bf16.apply({"params": params}, tokens)
    assert out.dtype == jnp.float32  # logits are returned in fp32 for the loss
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # parameters stay fp32
    np.testing.assert_allclose(out, ref, atol=0.05)


def test_tied_embeddings_have_no_lm_head():
    model, params = _init(dataclasses.replace(CFG, tie_embeddings=True))
    assert "lm_head" not in params
    assert sum(x.size for x in jax.tree.leaves(params)) == dataclasses.replace(CFG, tie_embeddings=True).num_params()
