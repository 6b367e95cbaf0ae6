"""THE mapping between kinoe parameters and Hugging Face tensors, written once as data.

Both converters and the tests read `RULES`; nothing else knows a tensor name. A rule names a
kinoe parameter *inside one decoder layer* (or at the top level), the HF tensor it becomes, and
the transform between the two layouts. `entries(cfg)` expands the rules for one model: it finds
where each layer lives in the params tree (scanned stack, interleaved MoE groups, or unscanned)
and which rules apply to which layer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable

import numpy as np


class ConversionError(ValueError):
    """A checkpoint or model that cannot be converted exactly; the message says what and why."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """kinoe layout <-> HF layout of one tensor (torch Linear weights are [out, in])."""

    name: str
    to_hf: Callable[[np.ndarray], np.ndarray]
    from_hf: Callable[[np.ndarray, tuple], np.ndarray]  # (HF tensor, kinoe shape) -> kinoe tensor
    hf_shape: Callable[[tuple], tuple]


def _heads_in_shape(s):
    return (s[1] * s[2], s[0])


def _heads_out_shape(s):
    return (s[2], s[0] * s[1])


IDENTITY = Transform("identity", lambda x: x, lambda w, s: w, lambda s: tuple(s))
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda w, s: w.T, lambda s: tuple(s)[::-1])
# q/k/v kernels are [embed, heads, head_dim]; HF keeps [heads * head_dim, embed]. kinoe's rotary
# is already HF's half-split form, so no per-head permutation is needed (unlike Meta's layout).
HEADS_IN = Transform("heads_in", lambda x: x.reshape(x.shape[0], -1).T,
                     lambda w, s: w.T.reshape(s), _heads_in_shape)
# o_proj is [heads, head_dim, embed]; HF keeps [embed, heads * head_dim].
HEADS_OUT = Transform("heads_out", lambda x: x.reshape(-1, x.shape[-1]).T,
                      lambda w, s: w.T.reshape(s), _heads_out_shape)

# Where a rule applies.
GLOBAL = "global"    # once per model
LAYER = "layer"      # every decoder layer
DENSE = "dense"      # layers with a dense SwiGLU MLP
MOE = "moe"          # layers with a mixture of experts
UNTIED = "untied"    # only when the LM head is not the embedding


@dataclasses.dataclass(frozen=True)
class Rule:
    kinoe: str      # path in the params tree; inside a layer for LAYER/DENSE/MOE; "[{expert}]" indexes the expert axis
    hf: str         # HF tensor name with {layer} and {expert} placeholders
    transform: Transform
    scope: str


# The canonical on-disk names every HF consumer reads (Mixtral: block_sparse_moe.experts.E.w1/w2/w3,
# which newer transformers fuse in memory but still load and save in this layout).
RULES: tuple[Rule, ...] = (
    Rule("embed/embedding", "model.embed_tokens.weight", IDENTITY, GLOBAL),
    Rule("attn_norm/scale", "model.layers.{layer}.input_layernorm.weight", IDENTITY, LAYER),
    Rule("attn/q_proj/kernel", "model.layers.{layer}.self_attn.q_proj.weight", HEADS_IN, LAYER),
    Rule("attn/k_proj/kernel", "model.layers.{layer}.self_attn.k_proj.weight", HEADS_IN, LAYER),
    Rule("attn/v_proj/kernel", "model.layers.{layer}.self_attn.v_proj.weight", HEADS_IN, LAYER),
    Rule("attn/o_proj/kernel", "model.layers.{layer}.self_attn.o_proj.weight", HEADS_OUT, LAYER),
    Rule("mlp_norm/scale", "model.layers.{layer}.post_attention_layernorm.weight", IDENTITY, LAYER),
    Rule("mlp/gate_proj/kernel", "model.layers.{layer}.mlp.gate_proj.weight", TRANSPOSE, DENSE),
    Rule("mlp/up_proj/kernel", "model.layers.{layer}.mlp.up_proj.weight", TRANSPOSE, DENSE),
    Rule("mlp/down_proj/kernel", "model.layers.{layer}.mlp.down_proj.weight", TRANSPOSE, DENSE),
    Rule("moe/router/kernel", "model.layers.{layer}.block_sparse_moe.gate.weight", TRANSPOSE, MOE),
    Rule("moe/wi_gate[{expert}]", "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight", TRANSPOSE, MOE),
    Rule("moe/wi_up[{expert}]", "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight", TRANSPOSE, MOE),
    Rule("moe/wo[{expert}]", "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight", TRANSPOSE, MOE),
    Rule("final_norm/scale", "model.norm.weight", IDENTITY, GLOBAL),
    Rule("lm_head/kernel", "lm_head.weight", TRANSPOSE, UNTIED),
)

# Buffers some HF checkpoints carry that are recomputed, not learned.
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor and where it lives in kinoe: `leaf[index]` of the params tree."""

    hf_name: str
    leaf: tuple[str, ...]
    index: tuple[int, ...]
    transform: Transform
    kinoe_shape: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.hf_shape(self.kinoe_shape))

    @property
    def leaf_name(self) -> str:
        return "/".join(self.leaf)


def layer_location(cfg, i: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(path prefix, index) of decoder layer i, mirroring kinoe_jax.models.decoder."""
    period = cfg.moe_layer_period if cfg.num_experts else 1
    name = "layer" if period == 1 else f"sub_{i % period}"
    if cfg.scan_layers:
        return ("layers", name), (i // period,)
    return (f"layers_{i // period}", name), ()


def _applies(rule: Rule, cfg, layer: int | None) -> bool:
    if rule.scope == GLOBAL:
        return True
    if rule.scope == UNTIED:
        return not cfg.tie_embeddings
    if rule.scope == LAYER:
        return True
    return (rule.scope == MOE) == cfg.is_moe_layer(layer)


def entries(cfg, leaf_shapes: dict[tuple[str, ...], tuple[int, ...]]) -> list[Entry]:
    """Every HF tensor of the model described by `cfg`, in leaf-major order.

    Leaf-major (all layers of q_proj, then all of k_proj, ...) lets the exporter read one stacked
    leaf once and emit its per-layer tensors in turn. `leaf_shapes` maps params-tree paths to
    shapes (see `param_shapes`); a mapped path missing there is an error in the table.
    """
    out: list[Entry] = []
    for rule in RULES:
        path, _, expert_part = rule.kinoe.partition("[")
        rel = tuple(path.split("/"))
        layers = [None] if rule.scope in (GLOBAL, UNTIED) else range(cfg.num_layers)
        for layer in layers:
            if not _applies(rule, cfg, layer):
                continue
            prefix, index = ((), ()) if layer is None else layer_location(cfg, layer)
            leaf = prefix + rel
            if leaf not in leaf_shapes:
                raise ConversionError(f"mapping rule {rule.kinoe!r} points at {'/'.join(leaf)}, which the "
                                      f"model does not have (params: {sorted('/'.join(p) for p in leaf_shapes)[:8]}...)")
            experts = range(cfg.num_experts) if expert_part else [None]
            for expert in experts:
                idx = index + (() if expert is None else (expert,))
                shape = tuple(leaf_shapes[leaf][len(idx):])
                name = rule.hf.format(layer=layer, expert=expert)
                out.append(Entry(name, leaf, idx, rule.transform, shape))
    _check_coverage(out, leaf_shapes)
    return out


def _check_coverage(out: list[Entry], leaf_shapes) -> None:
    """Every parameter element is mapped exactly once, so nothing is dropped on export."""
    seen: dict[tuple[str, ...], set] = {}
    for e in out:
        idx_set = seen.setdefault(e.leaf, set())
        if e.index in idx_set:
            raise ConversionError(f"{e.leaf_name}{list(e.index)} is mapped twice")
        idx_set.add(e.index)
    missing = sorted("/".join(p) for p in leaf_shapes if p not in seen)
    if missing:
        raise ConversionError(f"kinoe parameters with no HF mapping: {missing}")
    for leaf, idx_set in seen.items():
        depth = len(next(iter(idx_set)))
        need = int(np.prod(leaf_shapes[leaf][:depth])) if depth else 1
        if len(idx_set) != need:
            raise ConversionError(f"{'/'.join(leaf)}: {len(idx_set)} of {need} slices mapped")


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg) -> tuple:
    return tuple(_trace_param_shapes(cfg).items())


def param_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shapes of the params tree kinoe builds for `cfg` (abstract: nothing is allocated)."""
    return dict(_param_shapes(cfg))


def _trace_param_shapes(cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    # The conversion tools import this module (ConversionError) before they check their inputs,
    # which must not wait for JAX: it loads only when shapes are traced.
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from kinoe_jax.models import Transformer  # noqa: PLC0415

    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    params = nn.meta.unbox(boxed["params"])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}

