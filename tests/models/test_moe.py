"""The sparse MoE: transformers' routing, dropless == dense reference, losses, capacity, meshes."""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paths import REPO

from kinoe_jax.models import ModelConfig, Transformer
from kinoe_jax.models import moe_kernels as K
from kinoe_jax.models.moe import MoeBlock

# A larger init than training uses, so outputs are O(1) and routing decisive: tolerances then
# mean something.
CFG = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_seq_len=64, num_experts=4, num_experts_per_tok=2, init_std=0.3)


def _inputs(batch=3, length=12, pad_from=7, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, length, CFG.hidden_size))
    seg = jnp.ones((batch, length), jnp.int32).at[-1, pad_from:].set(0)  # last row ends in padding
    return x, seg


def _params(cfg=CFG, x=None, seg=None):
    if x is None:
        x, seg = _inputs()
    return jax.jit(lambda x, s: nn.meta.unbox(MoeBlock(cfg).init(jax.random.PRNGKey(1), x, s)["params"]))(x, seg)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, seg):
    return MoeBlock(cfg).apply({"params": params}, x, seg)


def _close(actual, expected, tol=1e-5, msg=""):
    """Equal up to tol relative to the largest magnitude (fp32 sums in another order)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol * scale, f"{msg}: max error {err:.3g} vs scale {scale:.3g}"


def _objective(cfg, seg):
    def f(params, x):
        out, aux = MoeBlock(cfg).apply({"params": params}, x, seg)
        return jnp.sum(jnp.sin(out) * seg[..., None]) + aux["moe_lb_loss"] + aux["moe_z_loss"]
    return f


@functools.partial(jax.jit, static_argnums=0)
def _grads(cfg, params, x, seg):
    return jax.grad(_objective(cfg, seg), argnums=(0, 1))(params, x)


def test_parameter_layout_is_the_converter_contract():
    x, seg = _inputs()
    boxed = MoeBlock(CFG).init(jax.random.PRNGKey(1), x, seg)["params"]
    shapes = jax.tree.map(lambda a: a.shape, nn.meta.unbox(boxed))
    axes = nn.get_partition_spec(boxed)
    e, f, n = CFG.hidden_size, CFG.intermediate_size, CFG.num_experts
    assert shapes == {"router": {"kernel": (e, n)}, "wi_gate": (n, e, f), "wi_up": (n, e, f), "wo": (n, f, e)}
    assert tuple(axes["router"]["kernel"]) == ("embed", None)
    assert tuple(axes["wi_gate"]) == tuple(axes["wi_up"]) == ("exp", "embed", "mlp")
    assert tuple(axes["wo"]) == ("exp", "mlp", "embed")


@pytest.mark.parametrize("impl,block", [("blocks", 64), ("blocks", 8), ("ragged", 64),
                                        pytest.param("gmm", 64, marks=pytest.mark.slow)])
def test_dropless_matches_dense_reference(impl, block):
    x, seg = _inputs()
    params = _params()
    ref_cfg = dataclasses.replace(CFG, moe_impl="dense")
    cfg = dataclasses.replace(CFG, moe_impl=impl, moe_block_size=block)
    out, aux = _apply(cfg, params, x, seg)
    ref, ref_aux = _apply(ref_cfg, params, x, seg)
    _close(out, ref, msg="output")
    assert float(jnp.max(jnp.abs(ref))) > 0.5  # the experts did something
    for key in ref_aux:
        np.testing.assert_allclose(aux[key], ref_aux[key], rtol=1e-6)
    grads = _grads(cfg, params, x, seg)
    ref_grads = _grads(ref_cfg, params, x, seg)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert float(jnp.max(jnp.abs(r))) > 0, path
        _close(g, r, msg=str(path))


def test_router_and_experts_match_transformers_mixtral():
    torch = pytest.importorskip("torch")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    x, _ = _inputs(batch=2, length=9)
    params = _params()
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size,
                                             num_local_experts=CFG.num_experts,
                                             num_experts_per_tok=CFG.num_experts_per_tok, router_jitter_noise=0.0))
    hf.eval()
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())  # noqa: E731
    with torch.no_grad():
        # gate.weight = router^T; experts E: w1 = wi_gate[E]^T, w3 = wi_up[E]^T, w2 = wo[E]^T (fused in memory).
        hf.gate.weight.copy_(t(params["router"]["kernel"].T))
        gate_up = np.concatenate([np.swapaxes(params["wi_gate"], 1, 2), np.swapaxes(params["wi_up"], 1, 2)], axis=1)
        hf.experts.gate_up_proj.copy_(t(gate_up))
        hf.experts.down_proj.copy_(t(np.swapaxes(params["wo"], 1, 2)))
        expected = hf(t(x)).numpy()
    out, _ = _apply(CFG, params, x, jnp.ones(x.shape[:2], jnp.int32))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-4)


def test_aux_losses_fractions_and_padding():
    x, seg = _inputs()
    params = _params()
    out, aux = _apply(CFG, params, x, seg)
    assert set(aux) == {"moe_lb_loss", "moe_z_loss", "expert_fraction"}
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in aux.values())
    assert aux["expert_fraction"].shape == (CFG.num_experts,)
    np.testing.assert_allclose(float(jnp.sum(aux["expert_fraction"])), 1.0, rtol=1e-6)

    # The statistics, recomputed by hand over the real tokens only.
    logits = np.einsum("bte,ex->btx", np.asarray(x), np.asarray(params["router"]["kernel"]))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[..., :CFG.num_experts_per_tok]
    real = np.asarray(seg) != 0
    counts = np.bincount(top[real].ravel(), minlength=CFG.num_experts)
    frac = counts / counts.sum()
    np.testing.assert_allclose(aux["expert_fraction"], frac, rtol=1e-6)
    lb = CFG.num_experts * np.sum(frac * probs[real].mean(0))
    np.testing.assert_allclose(aux["moe_lb_loss"], CFG.moe_lb_loss_coef * lb, rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(aux["moe_z_loss"], CFG.moe_z_loss_coef * np.mean(lse[real] ** 2), rtol=1e-5)

    # Padding is not routed: zero output, and what it holds changes nothing else.
    assert float(jnp.max(jnp.abs(out[~real]))) == 0.0
    x2 = jnp.where(jnp.asarray(real)[..., None], x, 100.0)
    out2, aux2 = _apply(CFG, params, x2, seg)
    np.testing.assert_allclose(out2, out, atol=1e-6)
    for key in aux:
        np.testing.assert_allclose(aux2[key], aux[key], rtol=1e-6)


def test_capacity_drops_and_counts():
    x, seg = _inputs(batch=4, length=16, pad_from=10)
    params = _params(x=x, seg=seg)
    k, n = CFG.num_experts_per_tok, CFG.num_experts
    dropless, _ = _apply(CFG, params, x, seg)
    cfg = dataclasses.replace(CFG, moe_capacity_factor=0.5)
    out, aux = _apply(cfg, params, x, seg)

    # Brute force: first choices claim capacity before second choices, then token order.
    tokens = int(np.prod(x.shape[:2]))
    cap = K.capacity_per_expert(tokens, k, n, 0.5)
    _, experts, _ = K.route(np.einsum("bte,ex->btx", x, params["router"]["kernel"]), k)
    experts = np.asarray(experts).reshape(tokens, k)
    real = np.asarray(seg).reshape(-1) != 0
    used = np.zeros(n, int)
    kept = np.zeros((tokens, k), bool)
    for j in range(k):
        for s in range(tokens):
            if real[s] and used[experts[s, j]] < cap:
                used[experts[s, j]] += 1
                kept[s, j] = True
    dropped = (real[:, None] & ~kept).sum()
    assert dropped > 0
    np.testing.assert_allclose(float(aux["dropped_fraction"]), dropped / (real.sum() * k), rtol=1e-6)
    # Tokens that kept every choice are computed exactly as without a capacity.
    whole = kept.all(1) & real
    flat = lambda a: np.asarray(a).reshape(tokens, -1)  # noqa: E731
    np.testing.assert_allclose(flat(out)[whole], flat(dropless)[whole], atol=1e-5)
    assert not np.allclose(flat(out)[real & ~whole], flat(dropless)[real & ~whole], atol=1e-5)

    # Enough capacity for anything: nothing dropped, identical to dropless.
    roomy = dataclasses.replace(CFG, moe_capacity_factor=n / k)
    out, aux = _apply(roomy, params, x, seg)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(out, dropless, atol=1e-5)


def _block_on_mesh(cfg, params, x, seg, mesh_kwargs):
    """Output, gradients and compiled HLO of one MoE block under a mesh and the rules table."""
    from kinoe_jax.parallel import sharding as shd
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.parallel.rules import flax_rules

    mesh = make_mesh(**mesh_kwargs)
    boxed = jax.eval_shape(lambda: MoeBlock(cfg).init(jax.random.PRNGKey(1), x, seg)["params"])
    p_shard = shd.to_named(mesh, shd.param_specs(boxed, mesh))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*shd.batch_spec(mesh, (1,) + seg.shape)[1:]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
        params = jax.device_put(params, p_shard)
        x, seg = jax.device_put(x, batch), jax.device_put(seg, batch)
        fn = jax.jit(lambda p, x, s: (MoeBlock(cfg).apply({"params": p}, x, s)[0], jax.grad(_objective(cfg, s))(p, x)))
        out, grads = fn(params, x, seg)
        hlo = fn.lower(params, x, seg).compile().as_text()
    return jax.device_get(out), jax.device_get(grads), hlo


@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_expert_parallel_block_matches_data_parallel(capacity):
    assert jax.device_count() == 8
    cfg = dataclasses.replace(CFG, num_experts=8, moe_capacity_factor=capacity)
    x, seg = _inputs(batch=8, length=16, pad_from=12)
    params = _params(cfg, x, seg)
    ref_out, ref_grads, _ = _block_on_mesh(cfg, params, x, seg, dict(data=8))
    for mesh_kwargs in (dict(data=2, expert=4), dict(data=1, fsdp=2, expert=4)):
        out, grads, hlo = _block_on_mesh(cfg, params, x, seg, mesh_kwargs)
        _close(out, ref_out, msg=str(mesh_kwargs))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            _close(g, r, msg=str(mesh_kwargs))
        if capacity:  # tokens travel to their experts' devices and back
            assert "all-to-all" in hlo, mesh_kwargs
    if not capacity:  # one group per device, also unsharded: routing never crosses groups
        single, _ = _apply(cfg, params, x, seg)
        _close(ref_out, single, msg="unsharded")


@pytest.mark.slow
def test_megablox_gmm_on_a_data_fsdp_tensor_mesh():
    """The TPU kernel (Pallas interpret mode here) per device under shard_map: each device's token
    groups, the FFN width split over 'tensor' with the down projection summed back."""
    cfg = dataclasses.replace(CFG, num_experts=8, moe_impl="gmm")
    x, seg = _inputs(batch=8, length=16, pad_from=12)
    params = _params(cfg, x, seg)
    ref_out, ref_grads, _ = _block_on_mesh(dataclasses.replace(cfg, moe_impl="dense"), params, x, seg, dict(data=8))
    out, grads, hlo = _block_on_mesh(cfg, params, x, seg, dict(data=2, fsdp=2, tensor=2))
    _close(out, ref_out, msg="gmm output")
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _close(g, r, msg="gmm gradients")
    assert "all-reduce" in hlo  # the tensor-parallel partial sums


def test_default_impl_by_platform():
    assert [K.default_impl(p) for p in ("cpu", "gpu", "tpu")] == ["blocks", "ragged", "gmm"]
    assert K.default_impl() == "blocks"  # this CPU, no mesh
    assert K.gmm_rows(300) == 384 and K.gmm_rows(5000) == 5120  # whole row tiles (128, then 512)


def test_interleaved_dense_and_moe_layers():
    tokens = jnp.ones((2, 8), jnp.int32)
    for scan in (True, False):
        cfg = dataclasses.replace(CFG, num_layers=4, moe_layer_period=2, moe_layer_offset=1, scan_layers=scan)
        init = lambda: nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"])  # noqa: E731
        # Run the scanned stack; for the unrolled one the shapes say enough.
        params = jax.jit(init)() if scan else jax.eval_shape(init)
        apply = jax.jit(Transformer(cfg).apply) if scan else functools.partial(jax.eval_shape, Transformer(cfg).apply)
        logits, aux = apply({"params": params}, tokens)
        assert aux["expert_fraction"].shape == (2, cfg.num_experts)  # two MoE layers of four
        first = params["layers"] if scan else params["layers_0"]
        assert "mlp" in first["sub_0"] and "moe" in first["sub_1"] and "moe" not in first["sub_0"]
        if scan:
            assert np.all(np.isfinite(logits))
            assert first["sub_1"]["moe"]["wi_gate"].shape == (2, 4, 32, 48)


def test_kv_cache_decoding_matches_full_forward():
    cfg = dataclasses.replace(CFG, num_layers=1)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 10), 4, cfg.vocab_size)
    params = jax.jit(lambda: nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens)["params"]))()
    full, _ = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
    step = jax.jit(functools.partial(Transformer(cfg, decode=True).apply, mutable=["cache"]))
    pos = jnp.arange(10)[None]
    (logits, _), cache = step({"params": params}, tokens[:, :9], pos[:, :9], jnp.ones((1, 9), jnp.int32))
    (last, _), _ = step({"params": params, **cache}, tokens[:, 9:], pos[:, 9:], jnp.ones((1, 1), jnp.int32))
    np.testing.assert_allclose(logits, full[:, :9], atol=1e-4)
    np.testing.assert_allclose(last[:, 0], full[:, 9], atol=1e-4)


def test_presets():
    import gin

    import kinoe_jax.training.loop  # noqa: F401  (registers the configurables the run file binds)
    from kinoe_jax.config.gin_io import load_gin

    load_gin([os.path.join(REPO, "gin_configs/models/mixtral_8x7b.gin")], [])
    mixtral = ModelConfig()
    gin.clear_config()
    # Mixtral-8x7B: 46.7B parameters, 12.9B active per token.
    assert abs(mixtral.num_params() / 1e9 - 46.7) < 0.05
    assert abs(mixtral.num_params(active_only=True) / 1e9 - 12.9) < 0.05
    load_gin([os.path.join(REPO, "gin_configs/runs/tiny_moe_ja.gin")], [])
    tiny = ModelConfig()
    gin.clear_config()
    load_gin([os.path.join(REPO, "gin_configs/models/tiny_ja.gin")], [])
    dense = ModelConfig()
    assert tiny.num_experts == 8 and tiny.num_experts_per_tok == 2
    # The same active parameters as the dense tiny model, up to the router.
    router = tiny.num_layers * tiny.hidden_size * tiny.num_experts
    assert tiny.num_params(active_only=True) == dense.num_params() + router


MOE_BINDINGS = ["ModelConfig.num_experts = 4", "ModelConfig.num_experts_per_tok = 2", "train.total_steps = 3"]
MESHES = {
    "data_parallel": ["make_mesh.data = 8"],
    "expert_4": ["make_mesh.data = 2", "make_mesh.expert = 4"],
    "fsdp_2_expert_4": ["make_mesh.data = 1", "make_mesh.fsdp = 2", "make_mesh.expert = 4"],
}


@pytest.mark.slow
def test_training_losses_agree_across_expert_meshes(tmp_path, train_run):
    assert jax.device_count() == 8
    losses = {}
    for name, bindings in MESHES.items():
        rows = train_run(tmp_path / name, MOE_BINDINGS + bindings)
        assert len(rows) == 3
        losses[name] = np.array([r["loss"] for r in rows])
        last = rows[-1]
        for key in ("moe_lb_loss/0", "moe_lb_loss/1", "moe_z_loss/0", "moe_z_loss/1", "expert_fraction/max"):
            assert np.isfinite(last[key]), key
        fractions = [last[f"expert_fraction/{i}"] for i in range(4)]
        np.testing.assert_allclose(sum(fractions), 1.0, rtol=1e-5)
    ref = losses["data_parallel"]
    assert np.all(np.isfinite(ref)) and ref[-1] < ref[0]
    for name, values in losses.items():
        np.testing.assert_allclose(values, ref, rtol=1e-5, err_msg=f"mesh {name} diverges from data parallel")
