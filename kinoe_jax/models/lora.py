"""LoRA: low-rank adapters beside the projections they adapt, and the tree operations on them.

A targeted projection `y = x @ W` becomes `y = x @ W + (alpha / rank) * (dropout(x) @ A) @ B`.
A and B live next to W in the params tree (`.../attn/q_proj/lora_a`, `.../lora_b`) in kinoe's own
layouts: A is [*in_dims, rank], B is [rank, *out_dims], so each carries the logical axes of the
side of W it shares and the rules table shards it like W. B starts at zero, so a fresh adapter
leaves the model exactly as it was.

Only the dense projections are adapted. Mixtral's experts are refused: their weights are one
[experts, in, out] array per kind, which HF/PEFT adapt expert by expert under other names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Sequence

import gin
import jax

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
ADAPTER_NAMES = ("lora_a", "lora_b")
RANK_AXIS = "lora_rank"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # on the adapter's input only, and only when a "dropout" rng is given
    targets: Sequence[str] = TARGETS

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)  # a tuple keeps the config hashable
        unknown = [t for t in targets if t not in TARGETS]
        problems = []
        if unknown:
            problems.append(f"unknown target module(s) {unknown}; the model's projections are {list(TARGETS)}")
        if not targets:
            problems.append("targets is empty")
        if len(set(targets)) != len(targets):
            problems.append(f"targets {list(targets)} repeat a module")
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank {self.rank!r} must be an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout {self.dropout} must be in [0, 1)")
        if problems:
            raise ValueError("LoraConfig: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projection_dims(cfg) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each projection a LoRA target can name."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return {"q_proj": (e, q), "k_proj": (e, kv), "v_proj": (e, kv), "o_proj": (q, e),
            "gate_proj": (e, f), "up_proj": (e, f), "down_proj": (f, e)}


def model_problems(cfg) -> list[str]:
    """Why `cfg.lora` does not fit the model `cfg` describes (ModelConfig reports them)."""
    lora = cfg.lora
    problems = []
    dims = projection_dims(cfg)
    too_small = [f"{t} ({dims[t][0]} -> {dims[t][1]})" for t in lora.targets if lora.rank > min(dims[t])]
    if too_small:
        problems.append(f"LoRA rank {lora.rank} is larger than {', '.join(too_small)}")
    mlp = [t for t in lora.targets if t in MLP_TARGETS]
    if cfg.num_experts and mlp:
        problems.append(f"LoRA targets {mlp} would adapt Mixtral experts, which kinoe does not support; "
                        f"target attention only ({', '.join(ATTENTION_TARGETS)})")
    return problems


def num_adapter_params(cfg) -> int:
    if cfg.lora is None:
        return 0
    dims = projection_dims(cfg)
    per_layer = sum(cfg.lora.rank * (dims[t][0] + dims[t][1]) for t in cfg.lora.targets)
    return per_layer * cfg.num_layers


def a_init(n_in: int):
    """A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)): the kaiming-uniform default of PEFT and torch Linear."""
    bound = 1.0 / math.sqrt(n_in)

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def adapted(x, a, b, scale: float, dtype):
    """scale * (x @ A) @ B for x [tokens, n_in], A [n_in, rank], B [rank, n_out].

    The scale is applied to the [tokens, rank] product: scaling the [tokens, n_out] output costs
    a pass over it forward and another backward."""
    return ((x @ a.astype(dtype)) * scale) @ b.astype(dtype)


# ----------------------------------------------------------------------------- params trees
def key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def is_adapter(path) -> bool:
    """True for an adapter leaf; `path` is a tuple of names or a jax key path."""
    return bool(path) and key_name(path[-1]) in ADAPTER_NAMES


def adapter_mask(params):
    """A tree of bools matching `params`: True on adapter leaves (for optax.masked and the like)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter(p), params)


def _filter(tree, keep_adapters: bool):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            sub = _filter(v, keep_adapters)
            if sub:
                out[k] = sub
        elif (k in ADAPTER_NAMES) == keep_adapters:
            out[k] = v
    return out


def base_only(params) -> dict:
    """The params tree without its adapters: what a model with `lora=None` takes."""
    return _filter(params, keep_adapters=False)


def adapters_only(params) -> dict:
    return _filter(params, keep_adapters=True)


def combine(base, adapters) -> dict:
    """One tree from disjoint base and adapter trees (the inverse of base_only/adapters_only)."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def merged_kernel(kernel, a, b, scale: float):
    """W + scale * A @ B in kinoe's layout, for one projection (any leading stacked-layer axes)."""
    lead = a.ndim + b.ndim - 2 - kernel.ndim
    rank = a.shape[-1]
    a2 = a.reshape(a.shape[:lead] + (-1, rank))
    b2 = b.reshape(b.shape[:lead] + (rank, -1))
    return (kernel + scale * (a2 @ b2).reshape(kernel.shape)).astype(kernel.dtype)


def merge(cfg, params) -> dict:
    """The base tree with every adapter folded into its kernel (what the merged HF export holds)."""
    if cfg.lora is None:
        return params
    scale = cfg.lora.scale

    def walk(node: Any):
        if not isinstance(node, Mapping):
            return node
        if "lora_a" in node and "lora_b" in node:
            out = {k: v for k, v in node.items() if k not in ADAPTER_NAMES}
            out["kernel"] = merged_kernel(node["kernel"], node["lora_a"], node["lora_b"], scale)
            return out
        return {k: walk(v) for k, v in node.items()}

    return walk(dict(params))
