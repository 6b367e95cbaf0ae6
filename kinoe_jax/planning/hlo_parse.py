"""The compiled program's HLO text as computations of instructions: parsing, loop trip counts,
how often each computation runs per step, and which devices each collective joins.

kinoe_jax.planning.hlo_stats counts what the program does from this; nothing here prices it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
               "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1,
               "f8e5m2": 1, "tf32": 4}

SHAPE_RE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type text (an array or a tuple)
    opcode: str
    operands: list
    attrs: str
    root: bool


def arrays(shape_text: str):
    """[(dtype, dims)] of an array or tuple type."""
    out = []
    for dtype, dims in SHAPE_RE.findall(shape_text):
        if dtype in DTYPE_BYTES:
            out.append((dtype, [int(d) for d in dims.split(",") if d]))
    return out


def nbytes(shape_text: str) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(dims) for d, dims in arrays(shape_text))


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


def multipliers(comps, entry) -> tuple[dict, set, int, int]:
    """How often each computation runs per step (entry once, a loop body times its trips, a
    computation called from several places the sum over its callers); the computations that
    run inside a loop; the number of loops and of loops whose trip count could not be read."""
    callers = defaultdict(list)  # callee -> [(caller, factor, through a loop)]
    loops = unknown = 0
    for comp, instrs in comps.items():
        for ins in instrs:
            factor = 1.0
            if ins.opcode == "while":
                loops += 1
                trips = _trip_count(ins, comps, instrs)
                unknown += trips is None
                factor = float(trips or 1)
            for callee in _callees(ins):
                if callee in comps:
                    callers[callee].append((comp, factor, ins.opcode == "while"))
    memo, looped = {entry: 1.0}, {entry: False}

    def mult(comp, depth=0):
        if comp not in memo:
            found = callers.get(comp, []) if depth <= 200 else []
            memo[comp] = sum(mult(c, depth + 1) * f for c, f, _ in found)
            looped[comp] = any(w or looped.get(c, False) for c, _, w in found)
        return memo[comp]

    out = {c: mult(c) for c in comps}
    return out, {c for c, v in looped.items() if v}, loops, unknown


def replica_groups(ins: Instr, num_devices: int) -> list | None:
    """The device groups a collective joins (partition ids), or None when the text does not say.
    collective-permute gives its (source, target) pairs as groups of two."""
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", ins.attrs)
    if pairs:
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9,\s]*)", pairs.group(1) + "}")]
    listed = re.search(r"replica_groups=\{(\{.*?\})\}", ins.attrs)
    if listed:
        return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9,\s]*)\}", listed.group(1))]
    if re.search(r"replica_groups=\{\}", ins.attrs):
        return [list(range(num_devices))]
    named = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([0-9,]+)\](?:T\(([0-9,]+)\))?\))?"
                      r"\s*\{([^}]*)\}", ins.attrs)
    if named:
        return _mesh_groups(named)
    iota = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", ins.attrs)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in iota.group(2).split(","))).reshape(
            [int(x) for x in iota.group(2).split(",")])
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    return None


def _mesh_groups(m) -> list:
    """Groups of the named-mesh form: mesh['a'=8,'b'=2], device_ids=([2,8]T(1,0)) {'b'}: the
    devices (an iota, reshaped and transposed as device_ids says) laid on the mesh, grouped
    along the axes in braces."""
    axes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
    sizes = [n for _, n in axes]
    ids = np.arange(math.prod(sizes))
    if m.group(2):
        ids = ids.reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    ids = ids.reshape(sizes)
    names = [a for a, _ in axes]
    grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(4)) if a in names]
    rest = [i for i in range(len(names)) if i not in grouped]
    size = math.prod(sizes[i] for i in grouped) if grouped else 1
    return ids.transpose(rest + grouped).reshape(-1, size).tolist()
