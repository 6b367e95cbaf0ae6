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
- custom calls: the executions of each opaque kernel (Pallas, cuDNN), which the caller prices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
               "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1,
               "f8e5m2": 1, "tf32": 4}
COLLECTIVES = {op + suffix: op for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                                         "collective-permute") for suffix in ("", "-start")}
COLLECTIVES.update({"ragged-all-to-all": "all-to-all"})
# Operations that move no data of their own (bookkeeping, control flow, the ends of async pairs).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "async-start", "async-done", "async-update",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "reduce-scatter-done", "all-to-all-done",
         "copy-done", "send-done", "recv-done",
         "add-dependency", "domain", "iota"}
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type text (an array or a tuple)
    opcode: str
    operands: list
    attrs: str
    root: bool


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


def _arrays(shape_text: str):
    """[(dtype, dims)] of an array or tuple type."""
    out = []
    for dtype, dims in _SHAPE.findall(shape_text):
        if dtype in DTYPE_BYTES:
            out.append((dtype, [int(d) for d in dims.split(",") if d]))
    return out


def _nbytes(shape_text: str) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in _arrays(shape_text))


def _split_top(s: str, sep: str = ",") -> list:
    """Split at top-level separators (outside (), {}, [])."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return parts


def _matching(s: str, start: int) -> int:
    """Index of the bracket closing the one at s[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth = 0
    for i in range(start, len(s)):
        if s[i] in pairs:
            depth += 1
        elif s[i] in pairs.values():
            depth -= 1
            if depth == 0:
                return i
    return len(s) - 1


def _parse_instr(line: str) -> Instr | None:
    line = re.sub(r"/\*.*?\*/", "", line)  # /*index=5*/ markers inside operand lists
    m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-$]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    operands = [o.strip().split()[-1].lstrip("%") for o in _split_top(rest[op.end():close]) if o.strip()]
    return Instr(m.group(2), shape, op.group(1), operands, rest[close + 1:], bool(m.group(1)))


def parse(hlo_text: str):
    """{computation name: [Instr]} and the entry computation's name."""
    comps, entry, current, pending = {}, None, None, None

    def flush():
        if current is not None and pending is not None:
            ins = _parse_instr(pending)
            if ins:
                comps[current].append(ins)

    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$", line)
        if header and not line.startswith(" "):
            current, pending = header.group(2), None
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.strip() == "}":
            flush()
            current, pending = None, None
        elif re.match(r"\s+(ROOT\s+)?%?[\w.\-]+\s*=", line):
            flush()
            pending = line
        elif pending is not None:
            pending += "\n" + line  # a backend_config spread over several lines
    return comps, entry


def _trip_count(while_ins: Instr, comps, caller: list) -> int | None:
    """From backend_config's known_trip_count, else from the loop itself: the condition
    `i < N` on a tuple element, that element's start value (the while's operand) and its step
    (the body adds a constant to it: XLA unrolls windowed einsums by two)."""
    known = re.search(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)', while_ins.attrs)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_ins.attrs)
    body = re.search(r"body=%?([\w.\-]+)", while_ins.attrs)
    cond_ins = comps.get(cond.group(1), []) if cond else []
    by_name = {i.name: i for i in cond_ins}
    for ins in cond_ins:
        if not (ins.root and ins.opcode == "compare") or len(ins.operands) != 2:
            continue
        direction = re.search(r"direction=(\w+)", ins.attrs)
        a, b = (by_name.get(o) for o in ins.operands)
        if direction is None or a is None or b is None:
            return None
        d = direction.group(1)
        if a.opcode == "constant":  # N > i  ==  i < N
            a, b, d = b, a, {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(d, d)
        index = re.search(r"index=(\d+)", a.attrs)
        if a.opcode != "get-tuple-element" or b.opcode != "constant" or not index or d not in ("LT", "LE"):
            return None
        limit = _int_constant(b)
        k = int(index.group(1))
        start = _tuple_element_constant(while_ins.operands[0] if while_ins.operands else None, k, caller)
        step = _loop_step(comps.get(body.group(1), []) if body else [], k)
        if limit is None or start is None or not step:
            return None
        return max(0, -(-(limit + (d == "LE") - start) // step))
    return None


def _int_constant(ins: Instr) -> int | None:
    return int(ins.operands[0]) if ins.operands and re.fullmatch(r"-?\d+", ins.operands[0]) else None


def _tuple_element_constant(tuple_name, k: int, comp: list) -> int | None:
    by_name = {i.name: i for i in comp}
    tup = by_name.get(tuple_name)
    if tup is None or tup.opcode != "tuple" or k >= len(tup.operands):
        return None
    element = _through_copies(by_name, tup.operands[k])
    return _int_constant(element) if element is not None and element.opcode == "constant" else None


def _through_copies(by_name: dict, name: str):
    """The instruction behind copies and bitcasts (loop counters are often copied)."""
    ins = by_name.get(name)
    while ins is not None and ins.opcode in ("copy", "bitcast", "convert") and ins.operands:
        ins = by_name.get(ins.operands[0])
    return ins


def _loop_step(body: list, k: int) -> int | None:
    by_name = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    if root is None or root.opcode != "tuple" or k >= len(root.operands):
        return None
    nxt = by_name.get(root.operands[k])
    if nxt is None or nxt.opcode != "add":
        return None
    for x, y in (nxt.operands, nxt.operands[::-1]):
        gte, const = _through_copies(by_name, x), _through_copies(by_name, y)
        if (gte is not None and const is not None and gte.opcode == "get-tuple-element"
                and re.search(rf"index={k}\b", gte.attrs) and const.opcode == "constant"):
            return _int_constant(const)
    return None


def _callees(ins: Instr) -> list:
    """Computations an instruction runs (reducers and combiners, scalar code, left out)."""
    found = re.findall(r"(?:calls|body|true_computation|false_computation)=%?([\w.\-]+)", ins.attrs)
    branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
    if branches:
        found += [b.strip().lstrip("%") for b in branches.group(1).split(",")]
    return found


def _multipliers(comps, entry, stats: HloStats) -> dict:
    """How often each computation runs per step: entry once, a loop body times its trips, a
    computation called from several places the sum over its callers."""
    callers = defaultdict(list)  # callee -> [(caller, factor)]
    for comp, instrs in comps.items():
        for ins in instrs:
            factor = 1.0
            if ins.opcode == "while":
                stats.loops += 1
                trips = _trip_count(ins, comps, instrs)
                if trips is None:
                    stats.loops_without_trip_count += 1
                factor = float(trips or 1)
            for callee in _callees(ins):
                if callee in comps:
                    callers[callee].append((comp, factor))
    memo = {entry: 1.0}

    def mult(comp, depth=0):
        if comp not in memo:
            memo[comp] = 0.0 if depth > 200 else sum(mult(c, depth + 1) * f for c, f in callers.get(comp, []))
        return memo[comp]

    return {c: mult(c) for c in comps}


def _dot_flops(ins: Instr, shapes: dict) -> float:
    out = _arrays(ins.shape)
    if not out:
        return 0.0
    out_elems = math.prod(out[0][1])
    if ins.opcode in ("dot", "ragged-dot"):
        lhs = _arrays(shapes.get(ins.operands[0], ""))
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        if not lhs or not dims:
            return 0.0
        k = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
        return 2.0 * out_elems * k
    if ins.opcode == "convolution":
        # TPU matmuls are convolutions; a "spatial" dim may be a window slid over padding (a
        # 1-long input), so each output uses min(window, input) positions along it.
        lhs = _arrays(shapes.get(ins.operands[0], ""))
        rhs = _arrays(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
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
        lhs = _arrays(shapes.get(ins.operands[0], ""))
        dims = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', ins.attrs)
        if not lhs or not dims:
            return 0.0
        k = math.prod(lhs[0][1][int(d.strip().strip('"'))] for d in dims.group(1).split(",") if d.strip())
        return 2.0 * out_elems * k
    return 0.0


def _group_size(attrs: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)) if a in sizes)
    return num_devices


def _collective_bytes(ins: Instr, shapes: dict, num_devices: int) -> float:
    kind = COLLECTIVES[ins.opcode]
    if kind == "collective-permute":
        return _nbytes(shapes.get(ins.operands[0], "")) if ins.operands else 0.0
    n = max(_group_size(ins.attrs, num_devices), 1)
    operand = sum(_nbytes(shapes.get(o, "")) for o in ins.operands)
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
            effective[index] = sum(_nbytes(u.shape) for u in uses)
        elif uses and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name for u in uses):
            effective[index] = 0.0
    shapes = {i.name: i.shape for i in comp}
    for ins in comp:
        if ins.root and ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
            write = _nbytes(shapes.get(ins.operands[1], ""))
    return effective, write


def analyze(hlo_text: str, num_devices: int, peak_flops: float | None = None,
            hbm_bytes_per_s: float | None = None) -> HloStats:
    comps, entry = parse(hlo_text)
    stats = HloStats()
    if entry is None:
        return stats
    mult = _multipliers(comps, entry, stats)
    shapes_of = {c: {i.name: i.shape for i in instrs} for c, instrs in comps.items()}
    fused = {c for instrs in comps.values() for i in instrs if i.opcode == "fusion"
             for c in re.findall(r"calls=%?([\w.\-]+)", i.attrs)}
    fusion_flops = {c: sum(_dot_flops(i, shapes_of[c]) for i in comps[c]) for c in fused if c in comps}
    coll_bytes, coll_count, calls, call_shapes = defaultdict(float), defaultdict(float), defaultdict(float), {}
    for comp, instrs in comps.items():
        m = mult.get(comp, 0.0)
        if not m or comp in fused:
            continue  # fused computations are priced through their fusion instruction
        shapes = shapes_of[comp]
        for ins in instrs:
            if ins.opcode in COLLECTIVES:
                kind = COLLECTIVES[ins.opcode]
                coll_bytes[kind] += m * _collective_bytes(ins, shapes, num_devices)
                coll_count[kind] += m
                continue
            if ins.opcode in _FREE:
                continue
            flops = _dot_flops(ins, shapes)
            out_bytes = _nbytes(ins.shape)
            in_bytes = [_nbytes(shapes.get(o, "")) for o in ins.operands]
            if ins.opcode == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
                if callee and callee.group(1) in comps:
                    flops = fusion_flops.get(callee.group(1), 0.0)
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
                call_shapes.setdefault(key, [shapes.get(o, "") for o in ins.operands])
                continue  # priced by the caller, who knows what the kernel computes
            stats.matmul_flops += m * flops
            stats.bytes_accessed += m * moved
            if peak_flops and hbm_bytes_per_s:
                stats.roofline_s += m * max(flops / peak_flops, moved / hbm_bytes_per_s)
    stats.collective_bytes = dict(coll_bytes)
    stats.collective_count = dict(coll_count)
    stats.custom_calls = dict(calls)
    stats.custom_call_operands = call_shapes
    return stats


def array_dims(shape_text: str) -> list:
    """The dims of the first array in a type text (for pricing kernels from their operands)."""
    arrays = _arrays(shape_text)
    return arrays[0][1] if arrays else []
