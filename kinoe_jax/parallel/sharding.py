"""Shardings of the train state and the batch, derived from logical axes and THE rules table."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kinoe_jax.parallel.rules import LOGICAL_AXIS_RULES, add_axis, logical_to_mesh


def param_specs(boxed_abstract_params, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """PartitionSpecs for parameters declared with nn.with_logical_partitioning."""
    logical = nn.get_partition_spec(boxed_abstract_params)
    shapes = nn.meta.unbox(boxed_abstract_params)
    return jax.tree.map(lambda spec, x: logical_to_mesh(tuple(spec) + (None,) * (x.ndim - len(spec)),
                                                        x.shape, mesh, rules),
                        logical, shapes, is_leaf=lambda s: isinstance(s, P))


def opt_state_specs(abstract_opt_state, abstract_params, p_specs, mesh: Mesh, zero1: bool):
    """Optimizer moments mirror the parameters; ZeRO-1 also splits them over the data axis."""
    params_def = jax.tree.structure(abstract_params)

    def is_param_tree(x):
        try:
            return jax.tree.structure(x) == params_def
        except Exception:  # noqa: BLE001
            return False

    def spec_for(sub):
        if is_param_tree(sub):
            if not zero1:
                return p_specs
            return jax.tree.map(lambda s, x: add_axis(s, x.shape, mesh, "data"), p_specs, sub,
                                is_leaf=lambda s: isinstance(s, P))
        return jax.tree.map(lambda _: P(), sub)

    return jax.tree.map(spec_for, abstract_opt_state, is_leaf=is_param_tree)


def to_named(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def batch_spec(mesh: Mesh, shape, rules=LOGICAL_AXIS_RULES) -> P:
    """Micro-batched inputs [accum, batch, length]: split the batch dimension."""
    return logical_to_mesh((None, "batch", "activation_length"), shape, mesh, rules)


def bytes_per_device(tree) -> dict:
    """Bytes of each device's addressable shards (checks the real layout, not a formula)."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.size * shard.data.dtype.itemsize
    return out

