"""What a compiled program does per device, read from its HLO text: matmul FLOPs, memory traffic,
collective bytes and chip-kernel calls, with every loop body counted as often as it runs.

Why not XLA's own cost analysis: it counts a while-loop body once. The scanned layers are such
a loop, and so are the collective matmuls the TPU compiler builds for FSDP ("windowed einsums":
an all-gather or reduce-scatter split into collective-permute steps, each overlapped with a
slice of the matmul). For mistral_7b under FSDP on 8 v5p chips the cost analysis therefore
reported half of the real matmul FLOPs. Here each loop's trip count is read from its condition
(`i < N`) or from `known_trip_count`, and multiplies everything the body calls.

Counted per device:
- matmul FLOPs: `dot` and `convolution` (2 per multiply-add), also inside fusions, and cuBLAS
  GEMM custom calls; elementwise work is left out, as in the 6N + 12LHQT formula;
- bytes: operands + results of each top-level operation (a fusion is one operation), with
  in-place dynamic-update-slices and dynamic-slices of stacked buffers counted by the slice;
- collectives: bytes each device sends or receives per kind (ring algorithms: all-gather and
  reduce-scatter move (n-1)/n of the full buffer, all-reduce twice that, collective-permute its
  operand once);
- custom calls: the executions of each opaque kernel (Pallas, cuDNN), which the caller prices;
- the network each collective uses, read from its replica groups (the devices that talk): given
  which granule (TPU slice, GPU host) each device is in, a group inside one granule is "inner"
  (ICI, NVLink), a group that spans granules "outer" (DCN, InfiniBand). Bytes are also split by
  whether they move inside a loop (the layer scan, where compute can hide them) or outside.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

from kinoe_jax.planning.hlo_parse import (
    DTYPE_BYTES,
    Instr,
    arrays,
    multipliers,
    nbytes,
    parse,
    replica_groups,
)

COLLECTIVES = {op + suffix: op for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                         "collective-permute") for suffix in ("", "-start")}
COLLECTIVES.update({"ragged-all-to-all": "all-to-all"})
# Operations that move no data of their own (bookkeeping, control flow, the ends of async pairs).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "async-start", "async-done", "async-update",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "reduce-scatter-done", "all-to-all-done",
         "copy-done", "send-done", "recv-done",
         "add-dependency", "domain", "iota"}
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")
# Operand types of the low-precision matmul modes (ModelConfig.matmul_dtype).
LOW_PRECISION = {"f8e4m3fn": "fp8", "f8e5m2": "fp8", "s8": "int8"}


@dataclasses.dataclass
class HloStats:
    matmul_flops: float = 0.0
    bytes_accessed: float = 0.0
    collective_bytes: dict = dataclasses.field(default_factory=dict)
    collective_count: dict = dataclasses.field(default_factory=dict)
    custom_calls: dict = dataclasses.field(default_factory=dict)  # name -> executions per step
    custom_call_operands: dict = dataclasses.field(default_factory=dict)  # name -> operand shapes
    loops: int = 0
    loops_without_trip_count: int = 0
    roofline_s: float = 0.0  # sum over operations of max(flops / peak, bytes / bandwidth)
    loop_roofline_s: float = 0.0  # the part of roofline_s inside loops
    # tier ("inner" | "outer") -> bytes per device per step, all of them / those inside loops
    tier_bytes: dict = dataclasses.field(default_factory=dict)
    tier_loop_bytes: dict = dataclasses.field(default_factory=dict)
    custom_calls_in_loops: dict = dataclasses.field(default_factory=dict)  # name -> executions inside loops
    # matmul mode ("fp8" | "int8") -> products whose operands are all of that mode per step, and
    # their FLOPs (priced at the mode's peak when analyze is given it)
    low_precision_gemms: dict = dataclasses.field(default_factory=dict)
    low_precision_flops: dict = dataclasses.field(default_factory=dict)


def _dot_flops(ins: Instr, shapes: dict) -> float:
    out = arrays(ins.shape)
    if not out:
        return 0.0
    out_elems = math.prod(out[0][1])
    if ins.opcode in ("dot", "ragged-dot"):
        lhs = arrays(shapes.get(ins.operands[0], ""))
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        if not lhs or not dims:
            return 0.0
        k = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
        return 2.0 * out_elems * k
    if ins.opcode == "convolution":
        # TPU matmuls are convolutions; a "spatial" dim may be a window slid over padding (a
        # 1-long input), so each output uses min(window, input) positions along it.
        lhs = arrays(shapes.get(ins.operands[0], ""))
        rhs = arrays(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
        labels = re.search(r"dim_labels=(\w+)_(\w+)->", ins.attrs)
        if not lhs or not rhs or not labels:
            return 0.0
        lhs_dims, rhs_dims = lhs[0][1], rhs[0][1]
        lhs_labels, rhs_labels = labels.group(1), labels.group(2)
        # A batched matmul may also come as a "base-dilated" convolution: batch dims as spatial
        # dims, the input dilated so each window meets one real element.
        dilate = re.search(r"lhs_dilate=([0-9x]+)", ins.attrs)
        dilation = [int(x) for x in dilate.group(1).split("x")] if dilate else []
        macs = rhs_dims[rhs_labels.index("i")] if "i" in rhs_labels else 1
        for pos, label in enumerate(rhs_labels):
            if label.isdigit() and label in lhs_labels:
                d = dilation[int(label)] if int(label) < len(dilation) else 1
                macs *= min(-(-rhs_dims[pos] // d), lhs_dims[lhs_labels.index(label)])
        return 2.0 * out_elems * macs
    if ins.opcode == "custom-call" and any(t in ins.attrs for t in _GEMM_TARGETS):
        lhs = arrays(shapes.get(ins.operands[0], ""))
        dims = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', ins.attrs)
        if not lhs or not dims:
            return 0.0
        k = math.prod(lhs[0][1][int(d.strip().strip('"'))] for d in dims.group(1).split(",") if d.strip())
        return 2.0 * out_elems * k
    return 0.0


def _low_precision(ins: Instr, shapes: dict) -> str | None:
    """The mode of a matmul whose two operands are both fp8 or both int8, else None."""
    if ins.opcode not in ("dot", "convolution", "ragged-dot") or len(ins.operands) < 2:
        return None
    kinds = {LOW_PRECISION.get((arrays(shapes.get(o, "")) or [("", [])])[0][0]) for o in ins.operands[:2]}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def _group_size(ins: Instr, num_devices: int) -> int:
    groups = replica_groups(ins, num_devices)
    if groups:
        return len(groups[0])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", ins.attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)) if a in sizes)
    return num_devices


def _collective_bytes(ins: Instr, shapes: dict, num_devices: int) -> float:
    kind = COLLECTIVES[ins.opcode]
    if kind == "collective-permute":
        return nbytes(shapes.get(ins.operands[0], "")) if ins.operands else 0.0
    n = max(_group_size(ins, num_devices), 1)
    operand = sum(nbytes(shapes.get(o, "")) for o in ins.operands)
    if kind == "all-gather":  # each device receives the n - 1 pieces it lacks
        return operand * (n - 1)
    if kind == "reduce-scatter":
        return operand * (n - 1) / n
    if kind == "all-reduce":
        return 2.0 * operand * (n - 1) / n
    return operand * (n - 1) / n  # all-to-all


def _fusion_param_bytes(comp: list) -> tuple[dict, float | None]:
    """Inside a fused computation: bytes each parameter really moves (a stacked buffer read
    through a dynamic-slice moves the slice; a dynamic-update-slice target is updated in place)
    and, for an in-place root, the bytes it writes."""
    params = {i.name: int(re.search(r"(\d+)", i.operands[0]).group(1)) if i.operands else 0
              for i in comp if i.opcode == "parameter"}
    users = defaultdict(list)
    for ins in comp:
        for o in ins.operands:
            users[o].append(ins)
    effective, write = {}, None
    for name, index in params.items():
        uses = users.get(name, [])
        if uses and all(u.opcode == "dynamic-slice" for u in uses):
            effective[index] = sum(nbytes(u.shape) for u in uses)
        elif uses and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name for u in uses):
            effective[index] = 0.0
    shapes = {i.name: i.shape for i in comp}
    for ins in comp:
        if ins.root and ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
            write = nbytes(shapes.get(ins.operands[1], ""))
    return effective, write


def tier(ins: Instr, num_devices: int, granule_of=None) -> str:
    """"outer" when the collective's groups span granules (or say nothing while there are
    several), else "inner". `granule_of[i]`: the granule of partition i."""
    if granule_of is None or len(set(granule_of)) <= 1:
        return "inner"
    groups = replica_groups(ins, num_devices)
    if groups is None:
        return "outer"
    return "outer" if any(len({granule_of[i] for i in g if i < len(granule_of)}) > 1 for g in groups) else "inner"


_MEGASCALE_KINDS = {"ALL_GATHER": "all-gather", "ALL_REDUCE": "all-reduce", "ALL_TO_ALL": "all-to-all",
                    "REDUCE_SCATTER": "reduce-scatter"}


def _megascale(ins: Instr) -> tuple[str, str] | None:
    """(rendezvous, kind) of a transfer between TPU slices: libtpu compiles the cross-slice part
    of a collective into host-transfer send/recv pairs over the data-centre network."""
    if ins.opcode not in ("send", "recv") or "xla_megascale_runtime" not in ins.attrs:
        return None
    key = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', ins.attrs)
    kind = re.search(r'_xla_megascale_transfer_type="([^"]+)"', ins.attrs)
    return (key.group(1) if key else ins.name, _MEGASCALE_KINDS.get(kind.group(1), "all-to-all") if kind else "all-to-all")


def _megascale_bytes(kind: str, sent: float, received: float, slices: int) -> float:
    """Bytes a device moves over the slow network for one transfer, by the ring convention above."""
    k = max(slices, 2)
    if kind == "all-gather":
        return max(received - sent, sent * (k - 1))
    if kind == "all-reduce":
        return 2.0 * sent * (k - 1) / k
    return sent * (k - 1) / k


def analyze(hlo_text: str, num_devices: int, peak_flops: float | None = None,
            hbm_bytes_per_s: float | None = None, granule_of=None, low_precision_peaks: dict | None = None) -> HloStats:
    """`low_precision_peaks` ({"fp8": FLOP/s, ...}) prices the low-precision products at their
    own peak instead of `peak_flops`."""
    comps, entry = parse(hlo_text)
    stats = HloStats()
    if entry is None:
        return stats
    mult, looped, stats.loops, stats.loops_without_trip_count = multipliers(comps, entry)
    tiers, tiers_loop, in_loops = defaultdict(float), defaultdict(float), defaultdict(float)
    transfers = {}  # rendezvous -> [kind, multiplier, in a loop, sent, received]
    shapes_of = {c: {i.name: i.shape for i in instrs} for c, instrs in comps.items()}
    fused = {c for instrs in comps.values() for i in instrs if i.opcode == "fusion"
             for c in re.findall(r"calls=%?([\w.\-]+)", i.attrs)}
    fusion_flops = {c: sum(_dot_flops(i, shapes_of[c]) for i in comps[c]) for c in fused if c in comps}
    fusion_low = {}  # fused computation -> {mode: [products, flops]}
    for c in fused & comps.keys():
        for i in comps[c]:
            mode = _low_precision(i, shapes_of[c])
            if mode:
                row = fusion_low.setdefault(c, {}).setdefault(mode, [0, 0.0])
                row[0], row[1] = row[0] + 1, row[1] + _dot_flops(i, shapes_of[c])
    low_gemms, low_flops = defaultdict(float), defaultdict(float)
    coll_bytes, coll_count, calls, call_shapes = defaultdict(float), defaultdict(float), defaultdict(float), {}
    for comp, instrs in comps.items():
        m = mult.get(comp, 0.0)
        if not m or comp in fused:
            continue  # fused computations are priced through their fusion instruction
        shapes = shapes_of[comp]
        for ins in instrs:
            if ins.opcode in COLLECTIVES:
                kind = COLLECTIVES[ins.opcode]
                moved = m * _collective_bytes(ins, shapes, num_devices)
                coll_bytes[kind] += moved
                coll_count[kind] += m
                where = tier(ins, num_devices, granule_of)
                tiers[where] += moved
                if comp in looped:
                    tiers_loop[where] += moved
                continue
            transfer = _megascale(ins)
            if transfer:
                row = transfers.setdefault(transfer[0], [transfer[1], m, comp in looped, 0.0, 0.0])
                data = arrays(ins.shape)
                row[3 if ins.opcode == "send" else 4] += DTYPE_BYTES[data[0][0]] * math.prod(data[0][1]) if data else 0.0
                continue
            if ins.opcode in _FREE:
                continue
            flops = _dot_flops(ins, shapes)
            mode = _low_precision(ins, shapes)
            low = {mode: [1, flops]} if mode else {}
            out_bytes = nbytes(ins.shape)
            in_bytes = [nbytes(shapes.get(o, "")) for o in ins.operands]
            if ins.opcode == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
                if callee and callee.group(1) in comps:
                    flops = fusion_flops.get(callee.group(1), 0.0)
                    low = fusion_low.get(callee.group(1), {})
                    effective, write = _fusion_param_bytes(comps[callee.group(1)])
                    in_bytes = [effective.get(i, b) for i, b in enumerate(in_bytes)]
                    if write is not None:
                        out_bytes = write
            elif ins.opcode == "dynamic-update-slice" and len(in_bytes) > 1:
                in_bytes[0], out_bytes = 0.0, in_bytes[1]
            elif ins.opcode == "dynamic-slice":
                in_bytes[0] = out_bytes
            moved = out_bytes + sum(in_bytes)
            if ins.opcode == "custom-call" and flops == 0.0:
                target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
                key = ins.name.split(".")[0] if target and target.group(1) == "tpu_custom_call" else (
                    target.group(1) if target else ins.name)
                calls[key] += m
                in_loops[key] += m if comp in looped else 0.0
                call_shapes.setdefault(key, [shapes.get(o, "") for o in ins.operands])
                continue  # priced by the caller, who knows what the kernel computes
            stats.matmul_flops += m * flops
            stats.bytes_accessed += m * moved
            compute_s = flops / peak_flops if peak_flops else 0.0
            for mode, (count, lp_flops) in low.items():
                low_gemms[mode] += m * count
                low_flops[mode] += m * lp_flops
                lp_peak = (low_precision_peaks or {}).get(mode)
                if peak_flops and lp_peak:
                    compute_s += lp_flops / lp_peak - lp_flops / peak_flops
            if peak_flops and hbm_bytes_per_s:
                seconds = m * max(compute_s, moved / hbm_bytes_per_s)
                stats.roofline_s += seconds
                stats.loop_roofline_s += seconds if comp in looped else 0.0
    slices = len(set(granule_of)) if granule_of else 2
    for kind, m, in_loop, sent, received in transfers.values():
        moved = m * _megascale_bytes(kind, sent, received, slices)
        coll_bytes[kind] += moved
        coll_count[kind] += m
        tiers["outer"] += moved
        if in_loop:
            tiers_loop["outer"] += moved
    stats.low_precision_gemms, stats.low_precision_flops = dict(low_gemms), dict(low_flops)
    stats.collective_bytes = dict(coll_bytes)
    stats.collective_count = dict(coll_count)
    stats.custom_calls = dict(calls)
    stats.custom_call_operands = call_shapes
    stats.custom_calls_in_loops = dict(in_loops)
    stats.tier_bytes, stats.tier_loop_bytes = dict(tiers), dict(tiers_loop)
    return stats
