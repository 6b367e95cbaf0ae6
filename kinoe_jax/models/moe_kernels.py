"""Routing and grouped expert matmuls for the MoE block, as pure functions.

Every function here works on one *group* of tokens (the tokens one batch shard holds) or on a
leading group axis G; the block in moe.py decides the groups. Shapes stay static: where the
number of tokens per expert varies, buffers are sized for the worst case and the unused part is
either skipped at run time (`blocks`) or never touched by the kernel (`ragged`).

Implementations of the dropless expert FFN, one interface (rows sorted by expert -> rows out):
  blocks  rows padded per expert to a multiple of `block`, a loop over blocks that runs only the
          used ones, each block one [block, embed] x [embed, mlp] matmul against its expert's
          weights. Fast on CPU, where ragged_dot computes every expert in full.
  ragged  jax.lax.ragged_dot on unpadded sorted rows: the backend kernel on GPU (Triton/XLA)
          and TPU (XLA ragged dot).
  gmm     the megablox grouped matmul (a Pallas TPU kernel with its own VJP) on the sorted rows,
          run per device under shard_map: TPU only (interpret mode elsewhere, for tests).
  dense   every expert on every token, masked by the router: the reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kinoe_jax.hardware.runtime import mesh_platform
from kinoe_jax.models import quant


# The dropless implementation chosen for each platform from measured or compiled figures
# (docs/moe.md): blocks on the CPU (bench_moe.py), ragged_dot on GPU, megablox gmm on TPU
# (tools/bench/bench_moe_tpu.py: libtpu's own figures for both, the kernel's cost added).
DEFAULT_IMPL = {"cpu": "blocks", "gpu": "ragged", "tpu": "gmm"}


def default_impl(platform: str | None = None) -> str:
    """The dropless implementation for a platform (default: the mesh's, see kinoe_jax.hardware.runtime)."""
    return DEFAULT_IMPL.get(platform or mesh_platform(), "ragged")


# ----------------------------------------------------------------------------- routing
def route(logits, k: int):
    """Softmax over experts in fp32, top-k, the k weights renormalised to sum to 1.

    The same function as transformers' Mixtral router. Returns (weights [..., k] fp32,
    experts [..., k] int32, probs [..., num_experts] fp32).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_e = _top_k(probs, k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return top_w, top_e, probs


def _top_k(probs, k: int):
    """k rounds of argmax: elementwise and reductions over the last axis only, which XLA keeps
    sharded along the batch (lax.top_k gets all-gathered). Ties go to the lower index."""
    values, indices = [], []
    for _ in range(k):
        i = jnp.argmax(probs, axis=-1).astype(jnp.int32)
        hit = jax.nn.one_hot(i, probs.shape[-1], dtype=jnp.bool_)
        values.append(jnp.sum(jnp.where(hit, probs, 0.0), axis=-1))
        indices.append(i)
        probs = jnp.where(hit, -1.0, probs)  # probabilities are >= 0: never picked again
    return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


def routing_stats(logits, probs, experts, valid, num_experts: int):
    """Global (all groups) statistics over real tokens only.

    Returns (lb, z, fraction): the Switch load-balancing loss num_experts * sum_e f_e * P_e with
    f_e the fraction of routed assignments and P_e the mean router probability (1.0 when
    perfectly balanced; transformers' Mixtral reports k times this), the ST-MoE z-loss
    mean(logsumexp(logits)^2), and f itself.
    """
    v = valid.astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(v), 1.0)
    hits = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * v[..., None, None]
    counts = jnp.sum(hits, axis=tuple(range(hits.ndim - 1)))
    fraction = counts / jnp.maximum(jnp.sum(counts), 1.0)
    mean_prob = jnp.sum(probs * v[..., None], axis=tuple(range(probs.ndim - 1))) / n_tok
    lb = num_experts * jnp.sum(fraction * mean_prob)
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    z = jnp.sum(jnp.square(lse) * v) / n_tok
    return lb, z, fraction


# ----------------------------------------------------------------------------- plans
class Plan(NamedTuple):
    """Where each assignment of one group goes, and where each buffer row comes from.

    slot_row [S, k]: buffer row of token s's j-th choice (== rows: not computed, i.e. a padding
    token or a dropped assignment). row_token [rows]: the token feeding each row (== S: empty).
    counts [num_experts]: routed assignments per expert. block_expert [rows // block] and
    used_blocks: the expert of each block and how many blocks hold any row. dropped: number of
    real assignments dropped (capacity path only).
    """

    slot_row: jax.Array
    row_token: jax.Array
    counts: jax.Array
    block_expert: jax.Array
    used_blocks: jax.Array
    dropped: jax.Array


def _sort_by_expert(expert_ids, num_experts: int):
    """Stable sort of flat assignments by expert id (num_experts = not routed, sorts last)."""
    order = jnp.argsort(expert_ids, stable=True)
    sorted_e = expert_ids[order]
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[expert_ids].add(1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(expert_ids.shape[0], dtype=jnp.int32) - starts[sorted_e]
    return order, sorted_e, rank, counts[:num_experts]


def dropless_rows(num_assignments: int, num_experts: int, block: int) -> int:
    """Static buffer rows for the dropless layout: every expert's group padded to a block
    multiple wastes at most block - 1 rows, so this bound holds for any routing."""
    blocks = (num_assignments + num_experts * (block - 1)) // block
    return max(blocks, 1) * block


def plan_dropless(experts, valid, num_experts: int, block: int, rows: int) -> Plan:
    """Assignments sorted by expert, each expert's rows padded to a multiple of `block`."""
    s, k = experts.shape
    e = jnp.where(valid[:, None], experts, num_experts).reshape(-1)  # token-major: a = s * k + j
    order, sorted_e, rank, counts = _sort_by_expert(e, num_experts)
    padded = (counts + block - 1) // block * block
    ends = jnp.cumsum(padded)
    pstart = ends - padded
    routed = sorted_e < num_experts
    dest = jnp.where(routed, pstart[jnp.minimum(sorted_e, num_experts - 1)] + rank, rows)
    slot_row = jnp.zeros(s * k, jnp.int32).at[order].set(dest).reshape(s, k)
    row_token = jnp.full(rows, s, jnp.int32).at[dest].set((order // k).astype(jnp.int32), mode="drop")
    block_starts = jnp.arange(rows // block, dtype=jnp.int32) * block
    block_expert = jnp.minimum(jnp.searchsorted(ends, block_starts, side="right"), num_experts - 1)
    return Plan(slot_row, row_token, counts, block_expert.astype(jnp.int32), ends[-1] // block,
                jnp.zeros((), jnp.int32))


def plan_capacity(experts, valid, num_experts: int, capacity: int) -> Plan:
    """[num_experts, capacity] rows; first choices claim capacity before second choices
    (then token order), and assignments past capacity are dropped."""
    s, k = experts.shape
    e = jnp.where(valid[None, :], experts.T, num_experts).reshape(-1)  # choice-major: a = j * s + t
    order, sorted_e, rank, counts = _sort_by_expert(e, num_experts)
    routed = sorted_e < num_experts
    keep = routed & (rank < capacity)
    rows = num_experts * capacity
    dest = jnp.where(keep, sorted_e * capacity + rank, rows)
    slot_row = jnp.zeros(s * k, jnp.int32).at[order].set(dest).reshape(k, s).T
    row_token = jnp.full(rows, s, jnp.int32).at[dest].set((order % s).astype(jnp.int32), mode="drop")
    dropped = jnp.sum(routed & ~keep).astype(jnp.int32)
    return Plan(slot_row, row_token, counts, jnp.arange(num_experts, dtype=jnp.int32),
                jnp.asarray(num_experts, jnp.int32), dropped)


def capacity_per_expert(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """ceil(factor * tokens * k / num_experts), rounded up to a multiple of 8 for the matmuls,
    never more than the tokens of a group (one token picks an expert at most once)."""
    c = -(-int(factor * tokens * k) // num_experts)
    return max(1, min(tokens, -(-c // 8) * 8))


def dispatch(x, row_token):
    """x [S, E] -> rows [R, E] (empty rows are zeros)."""
    return jnp.take(x, row_token, axis=0, mode="fill", fill_value=0)


def combine(rows, weights, slot_row):
    """rows [R, E], router weights [S, k], slot_row [S, k] -> [S, E] = sum_j w_j * rows[slot_j]."""
    picked = jnp.take(rows, slot_row, axis=0, mode="fill", fill_value=0)  # [S, k, E]
    out = jnp.einsum("sk,ske->se", weights.astype(jnp.float32), picked, preferred_element_type=jnp.float32)
    return out.astype(rows.dtype)


# ----------------------------------------------------------------------------- expert FFNs
def _silu_parts(a):
    s = jax.nn.sigmoid(a)
    return a * s, s * (1 + a * (1 - s))  # silu(a), silu'(a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_ffn(constrain, xb, block_expert, used, wi_gate, wi_up, wo):
    """SwiGLU experts over blocks of sorted rows.

    xb [nb, G, b, E] (block-major so the loop slices its leading axis), block_expert [nb, G],
    used: blocks at or past it are empty in every group and skipped. Weights stay fp32 [X, ...]
    and are cast per block; their gradients accumulate in fp32 into each group's own slot
    (a [G, X, ...] carry, so no collective runs inside the loop) and are summed at the end.
    constrain(array, logical_axes) pins that carry's group axis to the batch shards.
    """
    return _block_ffn_fwd(constrain, xb, block_expert, used, wi_gate, wi_up, wo)[0]


def _block_ffn_fwd(constrain, xb, block_expert, used, wi_gate, wi_up, wo):
    nb, g, b, _ = xb.shape
    f = wi_gate.shape[-1]
    dt = xb.dtype

    def body(_, inp):
        i, x, e = inp

        def run(_):
            a = jnp.einsum("gbe,gef->gbf", x, wi_gate[e].astype(dt))
            c = jnp.einsum("gbe,gef->gbf", x, wi_up[e].astype(dt))
            y = jnp.einsum("gbf,gfe->gbe", jax.nn.silu(a) * c, wo[e].astype(dt))
            return y, a, c

        def skip(_):
            z = jnp.zeros((g, b, f), dt)
            return jnp.zeros_like(x), z, z

        return None, jax.lax.cond(i < used, run, skip, None)

    _, (y, a, c) = jax.lax.scan(body, None, (jnp.arange(nb), xb, block_expert))
    return y, (xb, block_expert, used, wi_gate, wi_up, wo, a, c)


def _add_at(acc, e, update):
    """acc[g, e[g]] += update[g], written per group (vmap) so the scatter keeps the group as a
    batch dimension, which XLA partitions without moving data between devices."""
    return jax.vmap(lambda a, i, u: a.at[i].add(u))(acc, e, update)


def _block_ffn_bwd(constrain, res, dy):
    xb, block_expert, used, wi_gate, wi_up, wo, a_all, c_all = res
    g = xb.shape[1]
    dt = xb.dtype
    f32 = jnp.float32

    def body(carry, inp):
        i, x, e, a, c, gy = inp

        def run(carry):
            dg, du, do = carry
            silu, dsilu = _silu_parts(a)
            h = silu * c
            dh = jnp.einsum("gbe,gfe->gbf", gy, wo[e].astype(dt))
            da = dh * c * dsilu
            dc = dh * silu
            do = _add_at(do, e, jnp.einsum("gbf,gbe->gfe", h, gy, preferred_element_type=f32))
            dg = _add_at(dg, e, jnp.einsum("gbe,gbf->gef", x, da, preferred_element_type=f32))
            du = _add_at(du, e, jnp.einsum("gbe,gbf->gef", x, dc, preferred_element_type=f32))
            dx = (jnp.einsum("gbf,gef->gbe", da, wi_gate[e].astype(dt))
                  + jnp.einsum("gbf,gef->gbe", dc, wi_up[e].astype(dt)))
            return (dg, du, do), dx

        return jax.lax.cond(i < used, run, lambda cr: (cr, jnp.zeros_like(x)), carry)

    zeros = tuple(constrain(jnp.zeros((g,) + w.shape, f32), ("batch", None, None, None))
                  for w in (wi_gate, wi_up, wo))
    (dg, du, do), dx = jax.lax.scan(body, zeros, (jnp.arange(xb.shape[0]), xb, block_expert, a_all, c_all, dy))
    grads = tuple(jnp.sum(d, axis=0).astype(w.dtype) for d, w in zip((dg, du, do), (wi_gate, wi_up, wo)))
    return (dx, None, None) + grads


block_ffn.defvjp(_block_ffn_fwd, _block_ffn_bwd)


def ragged_ffn(rows, group_sizes, wi_gate, wi_up, wo, matmul_dtype: str = "default"):
    """rows [R, E] of ONE group sorted by expert, group_sizes [X]; rows past the groups come out
    zero. matmul_dtype fp8 / int8 quantizes the three products (kinoe_jax/models/quant.py)."""
    dt = rows.dtype

    def mm(x, w):
        return quant.ragged_dot(x, w.astype(dt), group_sizes, matmul_dtype)

    return mm(jax.nn.silu(mm(rows, wi_gate)) * mm(rows, wi_up), wo)


GMM_TILING = (512, 1024, 1024)  # rows, contraction, output tile of the megablox kernel


def gmm_tiling(rows: int, contract: int, out: int) -> tuple[int, int, int]:
    """Tiles for `rows` sorted rows: row tiles divide the (padded) buffer, the others are capped
    at the matrix (the kernel takes a ragged last tile along them)."""
    return min(GMM_TILING[0], -(-rows // 128) * 128), min(GMM_TILING[1], contract), min(GMM_TILING[2], out)


def gmm_rows(num_assignments: int) -> int:
    """Static buffer rows for the gmm layout: the assignments, padded to whole row tiles."""
    tm = gmm_tiling(num_assignments, 1, 1)[0]
    return -(-num_assignments // tm) * tm


def gmm_ffn(rows, group_sizes, wi_gate, wi_up, wo, interpret: bool = False):
    """rows [R, E] of ONE group sorted by expert, group_sizes [X] -> [R, E] (rows past the
    groups are not written: callers read only routed rows)."""
    # TPU-only: megablox is a Pallas TPU kernel, absent from some CPU and GPU installs.
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # noqa: PLC0415

    dt = rows.dtype

    def mm(x, w):
        tiles = gmm_tiling(x.shape[0], x.shape[1], w.shape[2])
        # Positional: the kernel's VJP takes its static arguments by position.
        return gmm(x, w.astype(dt), group_sizes, dt, tiles, None, None, False, interpret)

    return mm(jax.nn.silu(mm(rows, wi_gate)) * mm(rows, wi_up), wo)


def capacity_ffn(xb, wi_gate, wi_up, wo, constrain=lambda x, axes: x):
    """xb [G, X, C, E]: one batched matmul per expert over its fixed-capacity buffer."""
    dt = xb.dtype
    a = jnp.einsum("gxce,xef->gxcf", xb, wi_gate.astype(dt))
    c = jnp.einsum("gxce,xef->gxcf", xb, wi_up.astype(dt))
    h = constrain(jax.nn.silu(a) * c, ("expert_group", "exp", None, "activation_mlp"))
    return jnp.einsum("gxcf,xfe->gxce", h, wo.astype(dt))


def dense_reference(x, weights, experts, valid, wi_gate, wi_up, wo):
    """Every expert on every token, combined with the router weights (zero elsewhere).

    x [N, E], weights/experts [N, k], valid [N]. Costs num_experts / k times the routed work:
    the correctness reference, and a baseline in the benchmark.
    """
    dt = x.dtype
    num_experts = wi_gate.shape[0]
    comb = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=-2)
    comb = comb * valid[:, None].astype(jnp.float32)
    a = jnp.einsum("ne,xef->xnf", x, wi_gate.astype(dt))
    c = jnp.einsum("ne,xef->xnf", x, wi_up.astype(dt))
    y = jnp.einsum("xnf,xfe->xne", jax.nn.silu(a) * c, wo.astype(dt))
    return jnp.einsum("nx,xne->ne", comb, y, preferred_element_type=jnp.float32).astype(dt)


def block_size_for(num_assignments: int, num_experts: int, max_block: int) -> int:
    """Blocks no larger than an expert's fair share (rounded to 8): small inputs (decoding,
    tiny tests) then waste little padding, large ones use `max_block`."""
    fair = -(-num_assignments // num_experts)
    return max(1, min(max_block, -(-fair // 8) * 8))
