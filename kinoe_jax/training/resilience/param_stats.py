"""Per-group statistics of one step, computed inside the jitted step: what the spike detector and a
person reading metrics.jsonl need to see an update blowing up before the loss does.

Groups are the layer-stack kinds: attention, mlp (or experts), norms, embeddings, head. For each,
at every step:

  stats/<group>/grad_norm      L2 norm of the (accumulated, unclipped) gradients
  stats/<group>/update_norm    L2 norm of the applied update (new - old parameters; 0 when skipped)
  stats/<group>/param_norm     L2 norm of the parameters after the step
  stats/<group>/update_ratio   update_norm / param_norm
  stats/<group>/adam_nu_mean   mean of Adam's second moment (its element-wise gradient variance)
  stats/<group>/adam_nu_max    its largest element

and over all trained parameters `update_norm`, `param_norm`, `update_ratio`. Every statistic is a
reduction over arrays the step already holds, so XLA fuses them into the passes it makes anyway
(tools/bench/bench_param_stats.py measures the cost).
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

GROUPS = ("attention", "mlp", "experts", "norms", "embeddings", "head", "other")


@gin.configurable("param_stats")
@dataclasses.dataclass(frozen=True)
class ParamStatsConfig:
    enabled: bool = True  # the spike detector's update-ratio signal needs it


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def group_of(path) -> str:
    """The group of a parameter from its path in the params tree."""
    names = _names(path)
    if any("norm" in n for n in names):  # before "attn": attn_norm is a norm
        return "norms"
    if "embed" in names:
        return "embeddings"
    if "lm_head" in names:
        return "head"
    if "attn" in names:
        return "attention"
    if "moe" in names:
        return "experts"
    if "mlp" in names:
        return "mlp"
    return "other"


def _group_sums(tree, fn) -> dict[str, jax.Array]:
    sums: dict[str, jax.Array] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        g = group_of(path)
        sums[g] = sums.get(g, 0.0) + fn(x)
    return sums


def _sq(x):
    return jnp.sum(jnp.square(x.astype(jnp.float32)))


def second_moments(opt_state):
    """Adam's `nu` tree inside an optax state (None when the optimizer keeps none)."""
    found = []

    def visit(node):
        if hasattr(node, "nu") and hasattr(node, "mu"):
            found.append(node.nu)
            return
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)
        elif hasattr(node, "inner_state"):  # optax.masked and friends wrap the state
            visit(node.inner_state)

    visit(opt_state)
    return found[0] if found else None


def step_stats(old_params, new_params, grads, opt_state) -> dict[str, jax.Array]:
    """Traced. All trees hold the trained parameters only (LoRA: the adapters)."""
    grad_sq = _group_sums(grads, _sq)
    param_sq = _group_sums(new_params, _sq)
    update_sq = _group_sums(jax.tree.map(lambda n, o: n.astype(jnp.float32) - o.astype(jnp.float32),
                                         new_params, old_params), _sq)
    out = {}
    for g in param_sq:
        out[f"stats/{g}/grad_norm"] = jnp.sqrt(grad_sq[g])
        out[f"stats/{g}/update_norm"] = jnp.sqrt(update_sq[g])
        out[f"stats/{g}/param_norm"] = jnp.sqrt(param_sq[g])
        out[f"stats/{g}/update_ratio"] = jnp.sqrt(update_sq[g] / jnp.maximum(param_sq[g], 1e-30))
    nu = second_moments(opt_state)
    if nu is not None:
        sizes = _group_sums(nu, lambda x: jnp.float32(x.size))
        nu_sum = _group_sums(nu, lambda x: jnp.sum(x.astype(jnp.float32)))
        nu_max = {}
        for path, x in jax.tree_util.tree_flatten_with_path(nu)[0]:
            g = group_of(path)
            m = jnp.max(x.astype(jnp.float32)) if x.size else jnp.float32(0)
            nu_max[g] = jnp.maximum(nu_max[g], m) if g in nu_max else m
        for g in nu_sum:
            out[f"stats/{g}/adam_nu_mean"] = nu_sum[g] / sizes[g]
            out[f"stats/{g}/adam_nu_max"] = nu_max[g]
    total_update, total_param = sum(update_sq.values()), sum(param_sq.values())
    out["update_norm"] = jnp.sqrt(total_update)
    out["param_norm"] = jnp.sqrt(total_param)
    out["update_ratio"] = jnp.sqrt(total_update / jnp.maximum(total_param, 1e-30))
    return out
