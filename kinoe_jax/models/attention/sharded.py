"""Run a chip attention kernel once per device under shard_map, split by THE rules table.

A Pallas or cuDNN kernel sees one device's arrays; GSPMD cannot split it for us. The batch goes
where the rules put "batch", heads where they put "activation_heads" (only when both the query
and the key/value heads divide, so each device keeps whole GQA groups), and the query sequence
where they put "activation_length" (keys and values are then gathered whole: every query may
look back to the start of the row).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
from jax.sharding import PartitionSpec as P

from kinoe_jax.parallel.rules import LOGICAL_AXIS_RULES, logical_to_mesh


class Split(NamedTuple):
    batch: object  # mesh axis (or tuple of axes) of each split dimension, None: whole
    length: object
    heads: object
    head_shards: int
    length_shards: int


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def plan(q_shape, kv_heads: int, mesh, rules=LOGICAL_AXIS_RULES, split_length: bool = True) -> Split:
    b, t, h, _ = q_shape
    spec = logical_to_mesh(("batch", "activation_length", "activation_heads", None), q_shape, mesh, rules)
    batch, length, heads = spec[0], spec[1], spec[2]
    size = lambda entry: math.prod(mesh.shape[a] for a in _axes(entry))  # noqa: E731
    if heads is not None and kv_heads % size(heads):
        heads = None
    if not split_length:
        length = None
    return Split(batch, length, heads, size(heads), size(length))


def run(kernel: Callable, q, k, v, segment_ids, split: Split, mesh, extra=(), extra_specs=()):
    """kernel(q, k, v, q_segment_ids, kv_segment_ids, *extra) on each device's block.

    q [b, t, h, d]; k, v [b, t, kv, d]; segment_ids [b, t] -> [b, t, h, d] laid out like q.
    `extra` are further kernel arguments (the splash kernel's mask tables) with their specs.
    """
    q_spec = P(split.batch, split.length, split.heads, None)
    kv_spec = P(split.batch, None, split.heads, None)
    seg_q, seg_kv = P(split.batch, split.length), P(split.batch, None)
    fn = jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_q, seg_kv) + tuple(extra_specs),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k, v, segment_ids, segment_ids, *extra)
