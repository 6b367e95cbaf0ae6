"""LoRA in the model: exact at step 0, switchable off, shardable, and the same under scan and remat.

Random initialisation is the slowest thing XLA:CPU compiles, so the model is initialised once and
every test reuses those params (a config with fewer targets simply leaves some adapters unread).
"""

import dataclasses
import functools
import json
import re

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models import adapters as adapters_lib
from kinoe_jax.models import lora
from kinoe_jax.models.lora import LoraConfig

BASE = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_seq_len=32)
LORA = dataclasses.replace(BASE, lora=LoraConfig(rank=4, alpha=8.0))
TOKENS = np.random.default_rng(0).integers(4, 97, (2, 16))


@functools.lru_cache(maxsize=1)
def _fresh():
    """The LoRA model's own init (B zero)."""
    return nn.meta.unbox(jax.jit(Transformer(LORA).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _trained():
    """Adapters as after some training: B random (at init it is zero and proves nothing)."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * rng.standard_normal(x.shape, np.float32) if p[-1].key == "lora_b" else x, _fresh())


def _logits(cfg, params, **kw):
    return np.asarray(jax.jit(lambda p: Transformer(cfg, **kw).apply({"params": p}, TOKENS)[0])(params))


def test_fresh_adapters_reproduce_the_base_bitwise():
    own = _fresh()
    assert all(not np.any(x) for p, x in jax.tree_util.tree_flatten_with_path(own)[0] if p[-1].key == "lora_b")
    base = lora.base_only(own)
    base_logits = _logits(BASE, base)
    np.testing.assert_array_equal(_logits(LORA, own), base_logits)
    # Adapters added to a tree that has none (a kinoe checkpoint, an HF import): also exact.
    with_adapters = jax.jit(lambda b, k: adapters_lib.init_adapters(LORA, b, k))(base, jax.random.PRNGKey(5))
    assert jax.tree.structure(with_adapters) == jax.tree.structure(own)
    a = with_adapters["layers"]["layer"]["attn"]["q_proj"]["lora_a"]
    assert a.shape == (2, 32, 4) and 0.08 < float(jnp.std(a)) < 0.13  # U(+-1/sqrt(32)): std 0.102
    assert float(jnp.std(a[0] - a[1])) > 0.1  # every layer its own A
    np.testing.assert_array_equal(_logits(LORA, with_adapters), base_logits)


def test_switched_off_adapters_give_the_base_and_merge_gives_the_adapted():
    params = _trained()
    base = lora.base_only(params)
    adapted = _logits(LORA, params)
    off = _logits(LORA, params, lora_enabled=False)
    np.testing.assert_array_equal(off, _logits(BASE, base))
    np.testing.assert_array_equal(_logits(LORA, base, lora_enabled=False), off)  # adapter leaves not needed
    assert np.max(np.abs(adapted - off)) > 0.1
    merged = lora.merge(LORA, params)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(_logits(BASE, merged), adapted, atol=2e-5, rtol=1e-5)


def test_tree_helpers_split_and_rejoin():
    params = _fresh()
    adapters, base = lora.adapters_only(params), lora.base_only(params)
    n_adapters = len(jax.tree.leaves(adapters))
    assert n_adapters == 2 * len(lora.TARGETS)
    assert not any(lora.is_adapter(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0])
    assert jax.tree.structure(lora.combine(base, adapters)) == jax.tree.structure(params)
    assert sum(jax.tree.leaves(lora.adapter_mask(params))) == n_adapters
    assert sum(x.size for x in jax.tree.leaves(adapters)) == lora.num_adapter_params(LORA)
    paths = {tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    assert set(adapters_lib.adapter_shapes(LORA)) == paths
    assert lora.is_adapter(("layers", "layer", "mlp", "up_proj", "lora_b"))
    assert not lora.is_adapter(("layers", "layer", "mlp", "up_proj", "kernel"))


def _unstack(params, n):
    """Scanned params -> the unscanned layout (layers_i)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


DROPOUT = dataclasses.replace(LORA, lora=dataclasses.replace(LORA.lora, dropout=0.25))


def _loss(cfg, adapters, base, rngs=None):
    logits = Transformer(cfg).apply({"params": lora.combine(base, adapters)}, TOKENS, rngs=rngs)[0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


def _step(cfg, params):
    """(loss, adapter gradients) without a dropout rng, and the loss with one."""
    adapters, base = lora.adapters_only(params), lora.base_only(params)

    @jax.jit
    def step(adapters, key):
        plain, grads = jax.value_and_grad(lambda a: _loss(cfg, a, base))(adapters)
        return plain, grads, _loss(cfg, adapters, base, {"dropout": key})

    return adapters, step


@functools.lru_cache(maxsize=1)
def _reference():
    adapters, step = _step(DROPOUT, _trained())
    plain, grads, _ = step(adapters, jax.random.PRNGKey(3))
    return plain, grads


@pytest.mark.parametrize("scan,policy", [
    (True, "dots_no_batch"), (False, "full"),
    pytest.param(True, "none", marks=pytest.mark.slow), pytest.param(True, "full", marks=pytest.mark.slow),
    pytest.param(True, "dots", marks=pytest.mark.slow), pytest.param(False, "none", marks=pytest.mark.slow),
    pytest.param(False, "dots", marks=pytest.mark.slow), pytest.param(False, "dots_no_batch", marks=pytest.mark.slow),
])
def test_scan_and_remat_policies_agree(scan, policy):
    """The adapter gradients (all LoRA trains) and the loss match the scanned, non-remat model,
    and the dropout rng is honoured: it changes the loss, and the same key gives the same loss."""
    cfg = dataclasses.replace(DROPOUT, scan_layers=scan, remat_policy=policy)
    params = _trained() if scan else _unstack(_trained(), cfg.num_layers)
    adapters, step = _step(cfg, params)
    plain, grads, dropped = step(adapters, jax.random.PRNGKey(3))
    if not scan:
        grads = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[grads[f"layers_{i}"] for i in range(2)])}
    ref_loss, ref_grads = _reference()
    np.testing.assert_allclose(float(plain), float(ref_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(grads))
    assert float(dropped) != float(plain)
    assert float(step(adapters, jax.random.PRNGKey(3))[2]) == float(dropped)


def test_dropout_masks_differ_between_scanned_layers():
    """nn.scan splits the dropout rng per layer: two identical layers fed the same input still
    drop different units (a broadcast rng would drop the same ones)."""
    cfg = dataclasses.replace(LORA, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets=("q_proj",)))
    # Zero each layer's output projections: a layer then adds nothing, so both see the embedding;
    # and give both layers layer 0's weights.
    zero_out = lambda p, x: jnp.zeros_like(x) if p[-2].key in ("o_proj", "down_proj") else x  # noqa: E731
    params = jax.tree_util.tree_map_with_path(zero_out, _trained())
    params = dict(params, layers=jax.tree.map(lambda x: jnp.broadcast_to(x[:1], x.shape), params["layers"]))
    seen = []

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "q_proj" and context.method_name == "__call__":
            jax.debug.callback(lambda v: seen.append(np.asarray(v)), out, ordered=True)  # once per layer
        return out

    model = Transformer(cfg)
    for rngs in ({"dropout": jax.random.PRNGKey(0)}, None):
        seen.clear()
        with nn.intercept_methods(capture):
            model.apply({"params": params}, TOKENS, rngs=rngs)
        jax.effects_barrier()
        assert len(seen) == 2
        if rngs:
            assert float(np.max(np.abs(seen[0] - seen[1]))) > 1e-3
        else:  # without the rng: no dropout, and the identical layers compute the identical q
            np.testing.assert_array_equal(seen[0], seen[1])


def test_adapters_shard_through_the_rules_table():
    from jax.sharding import PartitionSpec as P

    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.parallel.sharding import param_specs, to_named

    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    init = Transformer(LORA).init
    boxed = jax.eval_shape(lambda: init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    specs = param_specs(boxed, mesh)
    layer = specs["layers"]["layer"]
    assert layer["attn"]["q_proj"]["lora_a"] == P(None, "fsdp", None)          # [layers, embed, rank]
    # A B without an embed dimension splits its rank over fsdp instead (FSDP holds 1/n of it).
    assert layer["attn"]["q_proj"]["lora_b"] == P(None, "fsdp", "tensor", None)  # [layers, rank, heads, head_dim]
    assert layer["attn"]["o_proj"]["lora_a"] == P(None, "tensor", None, "fsdp")  # [layers, heads, head_dim, rank]
    assert layer["attn"]["o_proj"]["lora_b"] == P(None, "fsdp", None)          # [layers, rank, embed]
    assert layer["mlp"]["down_proj"]["lora_a"] == P(None, "tensor", "fsdp")    # [layers, mlp, rank]
    # kv_heads (2) does not divide over tensor=4: the B of k_proj is split only by its rank.
    assert layer["attn"]["k_proj"]["lora_b"] == P(None, "fsdp", None, None)
    params = _trained()
    with jax.set_mesh(mesh):
        placed = jax.device_put(params, to_named(mesh, specs))
        assert placed["layers"]["layer"]["attn"]["q_proj"]["lora_a"].addressable_shards[0].data.shape == (2, 16, 4)
        sharded = jax.jit(lambda p: Transformer(LORA).apply({"params": p}, TOKENS)[0])(placed)
    np.testing.assert_allclose(np.asarray(sharded), _logits(LORA, params), atol=2e-5)


def test_bad_lora_configs_are_one_clear_line():
    cases = [
        (lambda: LoraConfig(targets=("q_proj", "qkv_proj")), r"unknown target module\(s\) \['qkv_proj'\]"),
        (lambda: LoraConfig(rank=0), "rank 0 must be an integer >= 1"),
        (lambda: dataclasses.replace(BASE, lora=LoraConfig(rank=20, targets=("k_proj",))),
         r"rank 20 is larger than k_proj \(32 -> 16\)"),
        (lambda: ModelConfig(num_experts=4, lora=LoraConfig(targets=("q_proj", "up_proj"))),
         r"would adapt Mixtral experts"),
    ]
    for make, pattern in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert re.search(pattern, str(err.value).splitlines()[0]), str(err.value)  # gin may add a line of its own
    moe_attention = ModelConfig(num_experts=4, lora=LoraConfig(targets=("q_proj", "v_proj")))
    assert moe_attention.lora.targets == ("q_proj", "v_proj")  # Mixtral's attention can be adapted


def test_config_round_trips_through_checkpoint_json_and_gin():
    stored = json.loads(json.dumps(dataclasses.asdict(LORA)))
    assert stored["lora"]["targets"] == list(lora.TARGETS)
    assert ModelConfig(**stored) == LORA and hash(ModelConfig(**stored)) == hash(LORA)
    old = {k: v for k, v in dataclasses.asdict(BASE).items() if k != "lora"}  # a checkpoint from before LoRA
    assert ModelConfig(**old).lora is None
    gin.parse_config("ModelConfig.lora = @LoraConfig()\nLoraConfig.rank = 8\nLoraConfig.targets = ['q_proj', 'v_proj']")
    assert ModelConfig().lora == LoraConfig(rank=8, targets=("q_proj", "v_proj"))
