"""The decoder's own KV cache: the same logits as the model, and a decode loop that neither
copies the cache nor slices weights on each token."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.inference import Engine, cached
from kinoe_jax.inference.engine import _COMPILED
from kinoe_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  max_seq_len=64, remat_policy="none")


def _params(cfg):
    init = jax.jit(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, nn.meta.unbox(init()))


@pytest.mark.parametrize("variant", ["scanned", "unscanned_tied_window", "moe_every_other_layer"])
def test_prefill_and_steps_give_the_models_logits(variant):
    cfg = {"scanned": CFG,
           "unscanned_tied_window": dataclasses.replace(CFG, scan_layers=False, tie_embeddings=True, sliding_window=5),
           "moe_every_other_layer": dataclasses.replace(CFG, num_experts=4, moe_layer_period=2)}[variant]
    params = _params(cfg)
    lengths, bucket, steps, slots = np.array([9, 3]), 16, 6, 24
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, cfg.vocab_size, n + steps).tolist() for n in lengths]
    tokens, positions, segments = (np.zeros((2, bucket), np.int32) for _ in range(3))
    for r, n in enumerate(lengths):  # left-padded, as the engine lays out prompts
        tokens[r, bucket - n:], positions[r, bucket - n:], segments[r, bucket - n:] = seqs[r][:n], np.arange(n), 1

    @jax.jit
    def run(params):
        layers = cached.layer_params(cfg, params)
        logits, cache = cached.prefill(cfg, params, layers, cached.empty_cache(cfg, 2, slots), tokens, positions,
                                       segments)
        out = [logits[:, 0]]
        for t in range(steps - 1):
            token = jnp.asarray([seqs[r][n + t] for r, n in enumerate(lengths)], jnp.int32)
            logits, cache = cached.step(cfg, params, layers, cache, token, jnp.asarray(lengths + t, jnp.int32),
                                        jnp.ones((2,), jnp.int32), jnp.asarray(bucket - lengths, jnp.int32),
                                        bucket + t)
            out.append(logits[:, 0])
        return jnp.stack(out, axis=1)

    got = np.asarray(run(params))
    model = Transformer(cfg)
    for r, n in enumerate(lengths):
        full = np.asarray(model.apply({"params": params}, jnp.asarray([seqs[r]]))[0])[0]
        np.testing.assert_allclose(got[r], full[n - 1:n - 1 + steps], rtol=2e-4, atol=2e-4)


def _loop_problems(text, cfg, rows):
    """Cache copies anywhere, and slices of a weight-sized array inside a loop, in HLO text."""
    problems = []
    weight = cfg.hidden_size * cfg.intermediate_size
    for line in text.splitlines():
        shape = re.search(r"= (\w+)\[([\d,]*)\]", line)
        if not shape:
            continue
        dims = [int(d) for d in shape.group(2).split(",") if d]
        if " copy(" in line and rows in dims and cfg.num_kv_heads in dims and cfg.dim_per_head in dims and len(dims) >= 4:
            problems.append(line.strip()[:120])
        if re.search(r" (dynamic-)?slice\(", line) and "while/body" in line and np.prod(dims) >= weight:
            problems.append(line.strip()[:120])
    return problems


def test_the_decode_loop_copies_no_cache_and_slices_no_weights():
    cfg = dataclasses.replace(CFG, hidden_size=48, intermediate_size=80)  # shapes no other test compiles
    engine = Engine(cfg, _params(cfg), batch_size=4)
    engine.generate([[1, 5, 9], [1, 7]], 5, stop_ids=())
    (text,) = [exe.as_text() for key, exe in _COMPILED.items() if key[0][0] == "decode" and key[1] == cfg]
    assert re.search(r"while\(", text), "the decode program has no loop"
    assert _loop_problems(text, cfg, 2) == []
    # Every layer's keys and values are donated and come back in place.
    header = text.splitlines()[0]  # HloModule ..., input_output_alias={ {0}: (12, {}, may-alias), ... }
    assert header.count("may-alias") >= 2 * cfg.num_layers
