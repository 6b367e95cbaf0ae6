"""The Mixtral sparse MoE block: a router picks k of num_experts SwiGLU experts per token.

Parameters (the HF converter relies on these names and shapes):
  router/kernel [embed, num_experts]      HF gate.weight transposed
  wi_gate       [num_experts, embed, mlp] HF experts.E.w1 transposed, stacked over E
  wi_up         [num_experts, embed, mlp] HF experts.E.w3 transposed
  wo            [num_experts, mlp, embed] HF experts.E.w2 transposed

Tokens are routed within groups, one group per batch shard, so sorting and gathering never
cross devices; the routing losses and statistics are still taken over the whole batch, so they
do not depend on the mesh. Padding tokens (segment id 0) are not routed: they get a zero output
and count in no statistic.

Dropless by default (every routed token is computed; kernels in moe_kernels.py, chosen per
backend). With ModelConfig.moe_capacity_factor > 0 each expert takes at most a fixed number of
rows per group and the rest are dropped (their residual passes through); that path lays the
rows out [group, expert, capacity, embed] and, under an 'expert' mesh axis, the sharding
constraint that moves experts onto that axis is an all-to-all XLA inserts. On the dropless
path an 'expert' axis shards the stored expert weights and optimizer state, and each layer
gathers the weights for its local tokens, as FSDP does.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from kinoe_jax.hardware.runtime import mesh_platform
from kinoe_jax.models import moe_kernels as K
from kinoe_jax.models.config import ModelConfig
from kinoe_jax.models.layers import _init


def _constrain(x, axes):
    return nn.with_logical_constraint(x, axes)


def batch_groups(batch: int) -> int:
    """How many shards the current mesh and rules split the batch into (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    axes = nn.logical_to_mesh_axes(("batch",))[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    groups = math.prod(mesh.shape[a] for a in axes)
    return groups if batch % groups == 0 else 1


class Router(nn.Module):
    """Bias-free linear layer to one logit per expert, computed in fp32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _init(self.cfg, ("embed", None)),
                            (x.shape[-1], self.cfg.num_experts), jnp.float32)
        return jnp.einsum("...e,ex->...x", x.astype(jnp.float32), kernel)


class MoeBlock(nn.Module):
    """x [batch, length, embed], segment_ids [batch, length] -> (out like x, aux dict)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, segment_ids=None):
        cfg = self.cfg
        b, t, e = x.shape
        n_exp, k, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size
        logits = _constrain(Router(cfg, name="router")(x), ("batch", "activation_length", None))
        weights = (
            self.param("wi_gate", _init(cfg, ("exp", "embed", "mlp")), (n_exp, e, f), jnp.float32),
            self.param("wi_up", _init(cfg, ("exp", "embed", "mlp")), (n_exp, e, f), jnp.float32),
            self.param("wo", _init(cfg, ("exp", "mlp", "embed")), (n_exp, f, e), jnp.float32),
        )
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
        gate_w, experts, probs = K.route(logits, k)
        lb, z, fraction = K.routing_stats(logits, probs, experts, valid, n_exp)
        aux = {"moe_lb_loss": cfg.moe_lb_loss_coef * lb, "moe_z_loss": cfg.moe_z_loss_coef * z,
               "expert_fraction": fraction}

        groups = batch_groups(b)
        s = b // groups * t

        def grouped(a):
            return a.reshape((groups, s) + a.shape[2:])

        xg = _constrain(grouped(x.astype(cfg.compute_dtype)), ("batch", None, "activation_embed"))
        gate_w, experts, valid = grouped(gate_w), grouped(experts), grouped(valid)
        if cfg.moe_capacity_factor > 0:
            out, dropped = _capacity(cfg, xg, gate_w, experts, valid, weights)
            aux["dropped_fraction"] = dropped / jnp.maximum(jnp.sum(valid) * k, 1).astype(jnp.float32)
        else:
            out = _dropless(cfg, xg, gate_w, experts, valid, weights)
        out = _constrain(out, ("batch", None, "activation_embed"))
        return out.reshape(b, t, e), aux


def _gathered(weights):
    """Expert weights whole along experts and embed (tensor-parallel mlp stays split): the
    dropless kernels pick experts per block, which a sharded expert axis cannot serve."""
    wi_gate, wi_up, wo = weights
    return (_constrain(wi_gate, (None, None, "mlp")), _constrain(wi_up, (None, None, "mlp")),
            _constrain(wo, (None, "mlp", None)))


def _dropless(cfg: ModelConfig, xg, gate_w, experts, valid, weights):
    groups, s, e = xg.shape
    n_exp, k = cfg.num_experts, cfg.num_experts_per_tok
    impl = K.default_impl() if cfg.moe_impl == "auto" else cfg.moe_impl
    if impl == "dense":
        return jax.vmap(K.dense_reference, in_axes=(0, 0, 0, 0, None, None, None))(
            xg, gate_w, experts, valid, *weights)
    block = 1 if impl in ("ragged", "gmm") else K.block_size_for(s * k, n_exp, cfg.moe_block_size)
    rows = K.gmm_rows(s * k) if impl == "gmm" else K.dropless_rows(s * k, n_exp, block)
    plan = jax.vmap(functools.partial(K.plan_dropless, num_experts=n_exp, block=block, rows=rows))(
        experts, valid)
    xr = jax.vmap(K.dispatch)(xg, plan.row_token)  # [G, rows, E], sorted by expert
    weights = _gathered(weights)
    if impl in ("ragged", "gmm"):
        yr = _grouped_per_device(impl, xr, plan.counts, weights, cfg.matmul_dtype)
    else:
        nb = rows // block
        xb = xr.reshape(groups, nb, block, e).transpose(1, 0, 2, 3)
        yb = K.block_ffn(_constrain, xb, plan.block_expert.T, jnp.max(plan.used_blocks), *weights)
        yr = yb.transpose(1, 0, 2, 3).reshape(groups, rows, e)
    return jax.vmap(K.combine)(yr, gate_w, plan.slot_row)


def _grouped_per_device(impl: str, xr, counts, weights, matmul_dtype: str = "default"):
    """The grouped-matmul kernels take one 2-D block of rows: run them per device under
    shard_map, each device on its own token groups (the batch shards) with the gathered expert
    weights. (The TPU compiler rejects a ragged dot with a batch dimension, which vmap over the
    groups would give it.) Under tensor parallelism every device holds a slice of the FFN
    width, so the down projection's partial sums are added over that axis."""
    if impl == "gmm":
        interpret = mesh_platform() != "tpu"
        ffn = lambda x, sizes, wg, wu, wo: K.gmm_ffn(x, sizes, wg, wu, wo, interpret)  # noqa: E731
    else:
        ffn = lambda x, sizes, wg, wu, wo: K.ragged_ffn(x, sizes, wg, wu, wo, matmul_dtype)  # noqa: E731

    def run(x, sizes, wg, wu, wo):
        return jax.lax.map(lambda a: ffn(a[0], a[1], wg, wu, wo), (x, sizes))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return run(xr, counts, *weights)
    P = jax.sharding.PartitionSpec
    groups = P(*nn.logical_to_mesh_axes(("batch",))) if batch_groups(xr.shape[0]) > 1 else P(None)
    mlp = nn.logical_to_mesh_axes(("mlp",))[0]
    mlp_axes = () if mlp is None else (mlp,) if isinstance(mlp, str) else tuple(mlp)
    if mlp_axes and weights[0].shape[-1] % math.prod(mesh.shape[a] for a in mlp_axes):
        mlp, mlp_axes = None, ()

    def per_device(x, sizes, wg, wu, wo):
        y = run(x, sizes, wg, wu, wo)
        return jax.lax.psum(y, mlp_axes) if mlp_axes else y

    return jax.shard_map(per_device, mesh=mesh, in_specs=(groups, groups, P(None, None, mlp), P(None, None, mlp),
                                                          P(None, mlp, None)),
                         out_specs=groups, check_vma=False)(xr, counts, *weights)


def _capacity(cfg: ModelConfig, xg, gate_w, experts, valid, weights):
    groups, s, e = xg.shape
    n_exp, k = cfg.num_experts, cfg.num_experts_per_tok
    cap = K.capacity_per_expert(s, k, n_exp, cfg.moe_capacity_factor)
    plan = jax.vmap(functools.partial(K.plan_capacity, num_experts=n_exp, capacity=cap))(experts, valid)
    xr = jax.vmap(K.dispatch)(xg, plan.row_token).reshape(groups, n_exp, cap, e)
    # Groups stay on the data-like axes while experts move onto 'expert': the all-to-all.
    xr = _constrain(xr, ("expert_group", "exp", None, "activation_embed"))
    yr = K.capacity_ffn(xr, *weights, constrain=_constrain)
    yr = _constrain(yr, ("expert_group", "exp", None, "activation_embed"))
    yr = _constrain(yr.reshape(groups, n_exp * cap, e), ("batch", None, "activation_embed"))
    out = jax.vmap(K.combine)(yr, gate_w, plan.slot_row)
    return out, jnp.sum(plan.dropped).astype(jnp.float32)
