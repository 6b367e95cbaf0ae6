"""The batched engine: greedy tokens equal to recomputing the whole sequence, rows that stop on
their own, sampling, bounded compiles, log-likelihoods, sharded parameters, long prompts."""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.inference import Engine, PromptTooLong
from kinoe_jax.models import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=96)
LENGTHS = [3, 11, 1, 26, 7, 19, 40, 5, 14]  # two buckets (16, 64), a partly filled last batch


def _params(cfg, seed=0):
    def init():
        params = Transformer(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
        # Large weights: greedy picks differ from step to step, so a wrong position or mask shows.
        return jax.tree.map(lambda x: x * 6 if x.ndim > 1 else x, nn.meta.unbox(params))

    return jax.jit(init)()


def _prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [[3] + rng.integers(11, 4000, n).tolist() for n in lengths]


def _greedy_without_cache(cfg, params, prompts, n):
    """Greedy decoding by re-running every whole sequence (right-padded, one compile)."""
    model = Transformer(cfg)
    width = max(len(p) for p in prompts) + n
    forward = jax.jit(lambda t, s: model.apply({"params": params}, t, None, s)[0])
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        tokens = np.zeros((len(seqs), width), np.int32)
        segs = np.zeros_like(tokens)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)], segs[i, :len(s)] = s, 1
        logits = np.asarray(forward(tokens, segs))
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize("window,scan,tied", [(None, True, False), pytest.param(4, False, True, marks=pytest.mark.slow)])
def test_batched_greedy_equals_recomputing_the_sequence(window, scan, tied):
    cfg = dataclasses.replace(CFG, sliding_window=window, scan_layers=scan, tie_embeddings=tied)
    params, prompts = _params(cfg), _prompts()
    engine = Engine(cfg, params, batch_size=8)  # a full batch and a batch of one
    out = engine.generate(prompts, 7, stop_ids=())
    assert [c.ids for c in out] == _greedy_without_cache(cfg, params, prompts, 7)
    assert {c.finish_reason for c in out} == {"length"}
    if scan:  # one prompt at a time (the single-prompt path) gives the same tokens
        from kinoe_jax.inference.texts import generate_ids

        for i in (2, 4):
            assert generate_ids(cfg, params, prompts[i], 7, stop_ids=()) == out[i].ids


def test_each_row_stops_on_its_own():
    params, prompts = _params(CFG), _prompts()
    engine = Engine(CFG, params, batch_size=16)
    free = engine.generate(prompts, 8, stop_ids=())
    # A token one row produces at step 3 (and not before) ends that row there.
    row = next(i for i, c in enumerate(free) if c.ids[3] not in c.ids[:3])
    stop = free[row].ids[3]
    out = engine.generate(prompts, 8, stop_ids=(stop,))
    for got, full in zip(out, free):
        cut = full.ids.index(stop) if stop in full.ids else len(full.ids)
        assert got.ids == full.ids[:cut]
        assert got.finish_reason == ("stop" if cut < len(full.ids) else "length")
    assert out[row].ids == free[row].ids[:3]

    # A stop string cuts the text before it; the ids end with the token that completed it.
    text = free[0].text
    needle = text[len(text) // 2: len(text) // 2 + 2]
    out = engine.generate(prompts[:3], 8, stop_ids=(), stop_strings=(needle,))
    assert out[0].finish_reason == "stop_string" and out[0].text == text[:text.index(needle)]
    assert out[0].ids == free[0].ids[:len(out[0].ids)]
    assert needle in engine.vocab.decode(out[0].ids) and needle not in engine.vocab.decode(out[0].ids[:-1])
    for got, full in zip(out[1:], free[1:3]):
        if needle not in full.text:
            assert got.ids == full.ids and got.finish_reason == "length"


def test_sampling_is_seeded_per_prompt():
    params, prompts = _params(CFG), _prompts()
    engine = Engine(CFG, params, batch_size=16)
    greedy = [c.ids for c in engine.generate(prompts, 6, stop_ids=())]
    kwargs = dict(stop_ids=(), temperature=1.0, seed=7)
    sampled = [c.ids for c in engine.generate(prompts, 6, **kwargs)]
    assert sampled != greedy
    # The same seed gives the same tokens, however the prompts are batched.
    assert [c.ids for c in Engine(CFG, params, batch_size=8).generate(prompts, 6, **kwargs)] == sampled
    assert [c.ids for c in engine.generate(prompts, 6, **{**kwargs, "seed": 8})] != sampled
    # top-k 1 and a tiny nucleus both leave only the argmax.
    assert [c.ids for c in engine.generate(prompts, 6, **kwargs, top_k=1)] == greedy
    assert [c.ids for c in engine.generate(prompts, 6, **kwargs, top_p=1e-6)] == greedy
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompts, 6, top_p=0.0)


@pytest.mark.slow
def test_compiles_are_bounded_by_buckets_and_shared_across_engines():
    cfg = dataclasses.replace(CFG, max_seq_len=200)  # a config of its own: nothing compiled yet
    params = _params(cfg)
    rng = np.random.default_rng(1)
    engine = Engine(cfg, params, batch_size=16)
    first = _prompts(rng.integers(1, 60, 40).tolist())
    engine.generate(first, 5, stop_ids=())
    # Buckets 16, 32, 64 (the last, partly filled batch keeps 16 rows): a program pair each at most.
    assert engine.stats["compiles"] <= 2 * 3
    before = engine.stats["compiles"]
    engine.generate(_prompts(rng.integers(1, 60, 40).tolist(), seed=3), 7, stop_ids=())
    assert engine.stats["compiles"] - before <= 2  # at most a bucket the first call did not need
    fresh = Engine(cfg, _params(cfg, seed=1), batch_size=16)  # new parameters, same layout
    fresh.generate(first, 5, stop_ids=())
    assert fresh.stats["compiles"] == 0


def test_loglikelihood_matches_a_plain_forward():
    params = _params(CFG)
    prompts = _prompts()
    pairs = [(p[:len(p) // 2 + 1], p[len(p) // 2 + 1:]) for p in prompts if len(p) > 2]
    out = Engine(CFG, params, ll_rows=2).loglikelihood(pairs)  # several calls of 2 packed rows
    tokens = np.zeros((len(pairs), 64), np.int32)
    for i, (context, continuation) in enumerate(pairs):
        tokens[i, :len(context) + len(continuation)] = context + continuation
    logits = Transformer(CFG).apply({"params": params}, tokens)[0]  # causal: the padding after is unseen
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for i, ((context, continuation), got) in enumerate(zip(pairs, out)):
        seq = context + continuation
        targets = range(len(context), len(seq))
        want = sum(float(logp[i, t - 1, seq[t]]) for t in targets)
        assert got.num_tokens == len(continuation)
        assert got.logprob == pytest.approx(want, abs=1e-3, rel=1e-5)
        assert got.is_greedy == all(int(np.argmax(logp[i, t - 1])) == seq[t] for t in targets)
    with pytest.raises(ValueError, match="pair 0"):
        Engine(CFG, params).loglikelihood([([3], [])])


@pytest.mark.slow
def test_fsdp_sharded_parameters_stay_put_and_give_the_same_results():
    from kinoe_jax.inference.loading import param_shardings
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.parallel.rules import flax_rules

    params, prompts = _params(CFG), _prompts()
    pairs = [(p[:2], p[2:]) for p in prompts if len(p) > 2]
    single = Engine(CFG, params, batch_size=16)
    mesh = make_mesh(data=1, fsdp=8)
    sharded = jax.device_put(params, param_shardings(CFG, mesh))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
    # Called the way the training loop calls it: inside its mesh and its activation rules.
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
        engine = Engine(CFG, sharded, batch_size=16)
        out = engine.generate(prompts, 6, stop_ids=())
        ll = engine.loglikelihood(pairs)
    assert engine.mesh == mesh
    assert all(a is b for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(sharded)))
    assert [c.ids for c in out] == [c.ids for c in single.generate(prompts, 6, stop_ids=())]
    np.testing.assert_allclose([x.logprob for x in ll], [x.logprob for x in single.loglikelihood(pairs)], rtol=1e-5)


def test_prompts_longer_than_the_context(caplog):
    cfg = dataclasses.replace(CFG, max_seq_len=32)
    params = _params(cfg)
    long, short = _prompts([40])[0], _prompts([5])[0]
    with pytest.raises(PromptTooLong, match="request 1 has 41 tokens; the context \\(32 tokens\\) leaves room for 24"):
        Engine(cfg, params, overflow="error").generate([short, long], 8)
    engine = Engine(cfg, params)
    kept = long[:1] + long[-23:]  # BOS and the last tokens: 24 + 8 new = the context
    with caplog.at_level(logging.WARNING):
        out = engine.generate([short, long, kept], 8, stop_ids=())
    assert "1 of 3 requests longer than the context (32 tokens) were truncated from the left" in caplog.text
    assert engine.stats["truncated_prompts"] == 1 and [c.truncated for c in out] == [0, 17, 0]
    assert out[1].ids == out[2].ids
    with pytest.raises(PromptTooLong):
        engine.generate([short], 32)  # no room left for the prompt at all


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "moe"])
def test_models_with_adapters_or_experts_decode_as_they_compute(variant):
    """The engine builds the model from the config it is given: LoRA adapters (nonzero, so they
    change the answer) and Mixtral experts take part in every step."""
    from kinoe_jax.models.lora import LoraConfig

    cfg = (dataclasses.replace(CFG, lora=LoraConfig(rank=4)) if variant == "lora"
           else dataclasses.replace(CFG, num_experts=4, num_experts_per_tok=2))
    params = _params(cfg)
    if variant == "lora":
        params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.3 if "lora_b" in jax.tree_util.keystr(p) else x,
                                                  params)
    prompts = _prompts([3, 11, 1, 26, 7])
    out = [c.ids for c in Engine(cfg, params, batch_size=8).generate(prompts, 6, stop_ids=())]
    assert out == _greedy_without_cache(cfg, params, prompts, 6)
    if variant == "lora":  # the adapters matter: the base model answers otherwise
        assert out != _greedy_without_cache(dataclasses.replace(cfg, lora=None), params, prompts, 6)
