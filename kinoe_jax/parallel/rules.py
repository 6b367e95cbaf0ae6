"""THE table of logical-axis rules: the only place that decides how arrays lie on the mesh.

Each logical axis name (used by parameters and activation constraints) lists candidate mesh
axes in order of preference. For every array, each dimension takes the first candidate whose
mesh axes are not already used by another dimension of the same array and whose total size
divides the dimension; otherwise it stays replicated. So one table serves data parallel
(mesh data=N), FSDP (fsdp=N), tensor parallel (tensor=N), expert parallel and mixtures of them:
a mesh axis of size 1 is simply a no-op.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

LOGICAL_AXIS_RULES: tuple[tuple[str, object], ...] = (
    # Activations: the batch is split over every data-like axis (expert parallelism also
    # splits the batch: tokens are exchanged with all-to-all inside the MoE block).
    ("batch", ("data", "fsdp", "expert")),
    ("batch", ("data", "fsdp")),
    ("batch", "data"),
    # MoE buffers [group, expert, capacity, embed]: groups (one per batch shard) keep the
    # data-like axes and experts take 'expert', so resharding tokens into them is the all-to-all.
    ("expert_group", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    # Parameters: FSDP shards the embed dimension; tensor parallelism shards heads / mlp / vocab.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("layers", None),
    # LoRA adapters split on the side they share with W; B of a q/k/v/gate/up projection has no
    # embed dimension, so its rank takes FSDP's axis (else it would be whole on every device).
    ("lora_rank", "fsdp"),
    ("norm", None),
)


def _size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> P:
    """Resolve one array's logical axes to a PartitionSpec, falling back where sizes don't divide."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        choice = None
        if name is not None:
            for rule_name, target in rules:
                if rule_name != name:
                    continue
                axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
                axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
                if not axes:
                    break  # an explicit "replicate" (or size-1 axes): stop here
                if used.intersection(axes) or dim % _size(mesh, axes):
                    continue
                choice = axes
                break
        if choice:
            used.update(choice)
            out.append(choice[0] if len(choice) == 1 else choice)
        else:
            out.append(None)
    return P(*out)


def add_axis(spec: P, shape: Sequence[int], mesh: Mesh, axis: str) -> P:
    """Also split an array over `axis` on the first dimension that still divides (ZeRO-1)."""
    if mesh.shape.get(axis, 1) == 1 or axis in jax.tree.leaves(tuple(spec)):
        return spec
    parts = list(spec) + [None] * (len(shape) - len(spec))
    for i, (part, dim) in enumerate(zip(parts, shape)):
        current = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        if dim % (_size(mesh, current) * mesh.shape[axis]) == 0:
            new = current + (axis,)
            parts[i] = new[0] if len(new) == 1 else new
            return P(*parts)
    return spec


def flax_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The same table in the form flax's activation constraints read (size-1 axes dropped, so
    flax falls through to the next candidate exactly like logical_to_mesh)."""
    out = []
    for name, target in rules:
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)

