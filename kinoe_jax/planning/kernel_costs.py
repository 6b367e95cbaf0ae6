"""What the opaque kernels cost: FLOPs and bytes of each Pallas or cuDNN call in a compiled step.

XLA's cost analysis (and kinoe_jax.planning.hlo_stats' matmul count) cannot see inside a Pallas kernel
or a cuDNN custom call: libtpu costs the splash attention kernel of a mistral_7b layer at 5e7
FLOPs for 4.8e11 real ones. Each call is priced here from its operands (batch, heads, sequence,
head size; rows and matrix sizes) and from the model's mask, counted the way the kernel works:
splash attention visits whole (block_q x block_kv) tiles that hold any visible pair, the
grouped matmul whole row tiles. The time of a call is its roofline on the chip:
max(FLOPs / peak, bytes / memory bandwidth).
"""

from __future__ import annotations

import dataclasses
import math

from kinoe_jax.planning.hlo_parse import DTYPE_BYTES, arrays


@dataclasses.dataclass
class KernelCost:
    name: str
    calls: float  # per step, per device
    flops: float  # per step, per device
    bytes: float

    def seconds(self, peak_flops: float, bytes_per_s: float) -> float:
        return max(self.flops / peak_flops, self.bytes / bytes_per_s)


def visible_pairs(seq_len: int, window, block_q: int, block_kv: int) -> float:
    """(query, key) pairs inside the (block_q x block_kv) tiles that hold any pair with
    0 <= q - k < window (causal when window is None)."""
    window = window or seq_len
    pairs = 0
    for i in range(-(-seq_len // block_q)):
        for j in range(-(-seq_len // block_kv)):
            nearest = i * block_q - ((j + 1) * block_kv - 1)
            farthest = (i + 1) * block_q - 1 - j * block_kv
            if farthest >= 0 and nearest < window:
                pairs += block_q * block_kv
    return float(pairs)


def _floatarrays(shapes):
    out = []
    for text in shapes:
        for dtype, dims in arrays(text):
            if dtype in ("bf16", "f16", "f32") and len(dims) >= 3:
                out.append((dtype, dims))
    return out


def _attention(name, calls, shapes, cfg, blocks, layout_bhtd: bool, split_dq: bool) -> KernelCost | None:
    arrays = _floatarrays(shapes)
    if not arrays:
        return None
    dtype, q = arrays[0]
    if layout_bhtd:  # splash: [(batch,) heads, t, d]
        t, d, rows = q[-2], q[-1], math.prod(q[:-2])
    else:  # cuDNN: [batch, t, heads, d]
        t, d, rows = q[1], q[-1], q[0] * q[2]
    bq, bkv = min(blocks[0], t), min(blocks[1], t)
    pairs = visible_pairs(t, cfg.sliding_window, bq, bkv)
    item = DTYPE_BYTES[dtype]
    lname = name.lower()
    if "backward" in lname or "_dq" in lname or "_dkv" in lname:
        # Fused backward: recompute S = QK^T, then dP = dO V^T, dV += P^T dO, dK += dS^T Q and
        # dQ += dS K (5 matmuls); split kernels: dq recomputes S and dP (3), dkv 4.
        per_pair = 6 if "_dq" in lname else (8 if split_dq else 10)
        moved = item * rows * d * (4 * t + 4 * pairs / bkv)
    else:
        per_pair = 4  # S = QK^T and PV
        moved = item * rows * d * (2 * t + 2 * pairs / bq)
    # cuDNN reads the [t, t] segment bias of each sequence (and writes its gradient).
    moved += sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays if dims[-2:] == [t, t])
    return KernelCost(name, calls, calls * per_pair * d * pairs * rows, calls * moved)


def _grouped_matmul(name, calls, shapes) -> KernelCost | None:
    arrays = [a for text in shapes for a in arrays(text) if a[0] in ("bf16", "f16", "f32")]
    mats = [a for a in arrays if len(a[1]) in (2, 3)]
    if len(mats) < 2:
        return None
    (dl, lhs), (dr, rhs) = mats[0], mats[1]
    if len(lhs) != 2:
        return None
    m, k = lhs
    n = rhs[-1] if len(rhs) == 3 and rhs[-2] == k else (rhs[-2] if len(rhs) == 3 else rhs[-1])
    if name.startswith("tgmm"):  # lhs^T [k, m] against grad [m, n]: the weight gradient
        k, m = lhs
        n = rhs[-1]
    flops = 2.0 * m * k * n
    moved = DTYPE_BYTES[dl] * (m * k + m * n) + DTYPE_BYTES[dr] * math.prod(rhs)
    return KernelCost(name, calls, calls * flops, calls * moved)


def price(custom_calls: dict, call_operands: dict, cfg) -> list[KernelCost]:
    """Costs of the kernels a step runs (`hlo_stats.HloStats.custom_calls` and operands)."""
    out = []
    blocks = (cfg.attention_block_q, cfg.attention_block_kv)
    split_dq = any("_dq" in n for n in custom_calls)
    for name, calls in custom_calls.items():
        shapes = call_operands.get(name, [])
        cost = None
        if name.startswith("splash"):
            cost = _attention(name, calls, shapes, cfg, blocks, True, split_dq)
        elif name.startswith("__cudnn$fmha"):
            # cuDNN skips fully masked tiles of its own (128 x 128 here) under the causal rule.
            cost = _attention(name, calls, shapes, cfg, (128, 128), False, split_dq)
        elif name.startswith(("gmm", "tgmm")) or (name.startswith("ragged-dot") and "metadata" not in name):
            # megablox, or XLA's own TPU kernel for jax.lax.ragged_dot (forward and input gradient;
            # the weight gradient it lowers as a dense convolution, which the HLO count sees).
            cost = _grouped_matmul(name, calls, shapes)
        if cost is not None:
            out.append(cost)
    return out


def unpriced(custom_calls: dict) -> list[str]:
    """Custom calls that do work but have no price here (so a report can say so)."""
    bookkeeping = ("AllocateBuffer", "PrepareAsyncCall", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                   "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked", "MoveToHost", "MoveToDevice",
                   "__cublas", "cu_threefry", "LayoutConstraint", "X64Combine", "X64SplitLow", "X64SplitHigh")
    return sorted(n for n in custom_calls
                  if not n.startswith(("splash", "__cudnn$fmha", "gmm", "tgmm", "ragged-dot"))
                  and not n.startswith(bookkeeping))
