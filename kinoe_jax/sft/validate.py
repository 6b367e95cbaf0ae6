"""Checks of SFT, preference and MT-Bench question files (the logic of tools/validate_sft.py).

Each file's kind is recognised from its first object: chat ("messages"), senryu (chat plus
"senryu" lines), preference ("prompt", "chosen", "rejected") or MT-Bench questions ("question_id",
"turns"). Every line gets the checks of its kind; then all items together get a near-duplicate
pass with the corpus tool's MinHash, counting pairs inside a set and across sets.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics

from tqdm import tqdm

from kinoe_jax.corpus.config import load_config
from kinoe_jax.corpus.dedup import NearDeduplicator, Signer
from kinoe_jax.corpus.filters import normalize_text
from kinoe_jax.data.chat.conversation import BadExample, check_length, check_messages, encode, parse_line
from kinoe_jax.data.chat.preference import encode_pair
from kinoe_jax.data.chat.report import Problem, read_lines
from kinoe_jax.sft import mora

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
# FastChat's judge grades these against a reference answer and stops when one is missing.
NEEDS_REFERENCE = ("math", "reasoning", "coding")
SENRYU_PATTERN = (5, 7, 5)


@dataclasses.dataclass
class Item:
    """One line that passed its checks, as the near-duplicate pass sees it."""

    set_name: str
    path: str
    line: int
    text: str


@dataclasses.dataclass
class FileResult:
    path: str
    kind: str = "unknown"
    lines: int = 0
    items: list[Item] = dataclasses.field(default_factory=list)
    errors: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[Problem] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)  # ids per example, BOS aside
    jiamari: list[str] = dataclasses.field(default_factory=list)  # deliberate ones, listed

    @property
    def set_name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


def detect_kind(obj: dict) -> str:
    if "question_id" in obj and "turns" in obj:
        return "mt_bench"
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "senryu" in obj:
        return "senryu"
    return "chat"


def _contents(messages, skip_system: bool = True) -> str:
    # System prompts repeat across a set by design; they would make every pair look alike.
    return "\n".join(m["content"] for m in messages if not (skip_system and m["role"] == "system"))


def _id(obj: dict):
    return obj.get("id", obj.get("question_id"))


# ----------------------------------------------------------------------------- per kind
def check_chat(obj: dict, vocab, seq_len: int) -> tuple[int, str]:
    messages = check_messages(obj["messages"])
    ids, weights = encode(messages, vocab)
    check_length(ids, weights, seq_len)
    return len(ids), _contents(messages)


def check_senryu(obj: dict) -> tuple[list[int], bool]:
    """(mora counts, deliberate jiamari); BadExample for anything that does not scan."""
    lines, jiamari, readings = obj.get("senryu"), obj.get("jiamari", False), obj.get("readings", {})
    if not (isinstance(lines, list) and len(lines) == 3 and all(isinstance(x, str) and x.strip() for x in lines)):
        raise BadExample("senryu_schema", "'senryu' must be a list of three non-empty lines")
    if not isinstance(jiamari, bool):
        raise BadExample("senryu_schema", "'jiamari' must be true or false")
    if not (isinstance(readings, dict) and all(isinstance(k, str) and isinstance(v, str) and mora.is_kana(v)
                                                for k, v in readings.items())):
        raise BadExample("senryu_schema", "'readings' must map surface strings to kana")
    for surface in readings:
        if not any(surface in x for x in lines):
            raise BadExample("senryu_schema", f"reading for {surface!r}, which is in no line")
    reply = next(m["content"] for m in obj["messages"] if m["role"] == "assistant")
    if not reply.startswith("\n".join(lines)):
        raise BadExample("senryu_mismatch", "the reply does not start with the three 'senryu' lines")
    try:
        counts = [mora.count_line(x, readings) for x in lines]
    except mora.ReadingError as e:
        raise BadExample("no_reading", str(e)) from None
    detail = " / ".join(f"{x}({n})" for x, n in zip(lines, counts))
    if any(n < want for n, want in zip(counts, SENRYU_PATTERN)):
        raise BadExample("jitarazu", f"a line is short of 5-7-5 (字足らず): {detail}")
    over = tuple(counts) != SENRYU_PATTERN
    if over and not jiamari:
        raise BadExample("not_575", f"not 5-7-5 and not marked jiamari: {detail}")
    if jiamari and not over:
        raise BadExample("jiamari_flag", f"marked jiamari but scans 5-7-5: {detail}")
    return counts, jiamari


def check_preference(line: str, vocab, seq_len: int) -> tuple[int, str]:
    (c_ids, c_w), (r_ids, r_w) = encode_pair(line, vocab)
    check_length(c_ids, c_w, seq_len)
    check_length(r_ids, r_w, seq_len)
    obj = json.loads(line)
    return max(len(c_ids), len(r_ids)), _contents(obj["prompt"]) + "\n" + obj["chosen"]


def check_mt_bench(obj: dict) -> str:
    qid, cat, turns = obj.get("question_id"), obj.get("category"), obj.get("turns")
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise BadExample("mt_bench_schema", f"question_id {qid!r} is not an integer")
    if cat not in MT_BENCH_CATEGORIES:
        raise BadExample("mt_bench_schema", f"category {cat!r} not one of {MT_BENCH_CATEGORIES}")
    if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) and t.strip() for t in turns)):
        raise BadExample("mt_bench_schema", "'turns' must be two non-empty questions")
    ref = obj.get("reference")
    if ref is not None and not (isinstance(ref, list) and len(ref) == len(turns)
                                and all(isinstance(r, str) and r.strip() for r in ref)):
        raise BadExample("mt_bench_schema", "'reference' must hold one answer per turn")
    return "\n".join(turns)


# ----------------------------------------------------------------------------- a file
def check_file(path: str, vocab, seq_len: int) -> FileResult:
    res = FileResult(path)
    seen_ids: dict = {}
    categories: collections.Counter = collections.Counter()
    for line_no, text in read_lines(path):
        res.lines += 1
        try:
            if isinstance(text, BadExample):
                raise text
            obj = parse_line(text, key=None)
            if res.kind == "unknown":
                res.kind = detect_kind(obj)
            key = _id(obj)
            if key is not None:
                if key in seen_ids:
                    raise BadExample("duplicate_id", f"id {key!r} also on line {seen_ids[key]}")
                seen_ids[key] = line_no
            if res.kind == "mt_bench":
                dedup_text = check_mt_bench(obj)
                categories[obj["category"]] += 1
                if obj["category"] in NEEDS_REFERENCE and "reference" not in obj:
                    res.warnings.append(Problem(path, line_no, "no_reference",
                                                f"{obj['category']} question {obj['question_id']}: FastChat's "
                                                "judge needs a reference answer for this category"))
            elif res.kind == "preference":
                length, dedup_text = check_preference(text, vocab, seq_len)
                res.lengths.append(length)
            else:
                if "messages" not in obj:
                    raise BadExample("missing_messages", f"keys {sorted(obj)[:8]}")
                length, dedup_text = check_chat(obj, vocab, seq_len)
                if res.kind == "senryu":
                    _, jiamari = check_senryu(obj)
                    if jiamari:
                        res.jiamari.append(f"{path}:{line_no} {key}: " + " / ".join(obj["senryu"]))
                res.lengths.append(length)
            res.items.append(Item(res.set_name, path, line_no, dedup_text))
        except BadExample as e:
            res.errors.append(Problem(path, line_no, e.reason, e.detail))
    missing = [c for c in MT_BENCH_CATEGORIES if not categories[c]]
    if res.kind == "mt_bench" and missing:
        res.warnings.append(Problem(path, 0, "categories", f"no question in {missing}"))
    return res


# ----------------------------------------------------------------------------- near duplicates
@dataclasses.dataclass
class DuplicatePair:
    first: Item
    second: Item

    def __str__(self) -> str:
        return f"{self.second.path}:{self.second.line} ~ {self.first.path}:{self.first.line}"


def near_duplicates(items: list[Item], threshold: float | None = None) -> list[DuplicatePair]:
    """Greedy MinHash-LSH pass in input order (the corpus tool's): each item that is a near
    duplicate of an earlier kept one is paired with it."""
    cfg = load_config().dedup
    if threshold is not None:
        cfg = dataclasses.replace(cfg, threshold=threshold)
    signer, dedup = Signer(cfg), NearDeduplicator(cfg)
    pairs = []
    for i, item in enumerate(items):
        other = dedup.check(signer.signature(normalize_text(item.text)), i)
        if other is not None:
            pairs.append(DuplicatePair(items[other], item))
    return pairs


def duplicate_rates(results: list[FileResult], pairs: list[DuplicatePair]) -> dict[tuple[str, str], float]:
    """(set, earlier set) -> fraction of `set`'s items that duplicate an item of `earlier set`."""
    sizes = {r.set_name: len(r.items) for r in results}
    counts = collections.Counter((p.second.set_name, p.first.set_name) for p in pairs)
    return {k: v / max(sizes[k[0]], 1) for k, v in counts.items()}


# ----------------------------------------------------------------------------- everything
@dataclasses.dataclass
class Validation:
    files: list[FileResult]
    duplicates: list[DuplicatePair]
    max_near_dup_rate: float

    @property
    def rates(self) -> dict[tuple[str, str], float]:
        return duplicate_rates(self.files, self.duplicates)

    @property
    def failed_rates(self) -> dict[tuple[str, str], float]:
        return {k: v for k, v in self.rates.items() if v > self.max_near_dup_rate}

    @property
    def ok(self) -> bool:
        return not any(f.errors for f in self.files) and not self.failed_rates

    def text(self) -> str:
        out = []
        for f in self.files:
            lengths = (f" tokens min/median/max {min(f.lengths)}/{int(statistics.median(f.lengths))}/{max(f.lengths)}"
                       if f.lengths else "")
            out.append(f"{f.path}: {f.kind}, {f.lines} lines, {len(f.items)} ok, {len(f.errors)} errors{lengths}")
            out += [f"  ERROR {p}" for p in f.errors]
            out += [f"  warning {p}" for p in f.warnings]
            if f.kind == "senryu":
                out.append(f"  deliberate jiamari ({len(f.jiamari)}):")
                out += [f"    {j}" for j in f.jiamari]
        names = [f.set_name for f in self.files]
        out.append(f"near-duplicate rate (share of a set's items that repeat an earlier item; limit "
                   f"{self.max_near_dup_rate:g}):")
        rates = self.rates
        for a in names:
            row = [f"{b}={rates.get((a, b), 0.0):.3f}" for b in names[: names.index(a) + 1]]
            out.append(f"  {a}: " + ", ".join(row))
        out += [f"  pair {p}" for p in self.duplicates]
        for (a, b), v in self.failed_rates.items():
            out.append(f"  ERROR {a} repeats {b} at rate {v:.3f} > {self.max_near_dup_rate:g}")
        out.append("OK" if self.ok else "FAILED")
        return "\n".join(out)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "files": [{"path": f.path, "kind": f.kind, "lines": f.lines, "ok": len(f.items),
                       "errors": [str(p) for p in f.errors], "warnings": [str(p) for p in f.warnings],
                       "max_tokens": max(f.lengths, default=0), "jiamari": f.jiamari} for f in self.files],
            "near_duplicate_rates": {f"{a} ~ {b}": v for (a, b), v in self.rates.items()},
            "near_duplicate_pairs": [str(p) for p in self.duplicates],
        }


def validate(paths: list[str], vocab, seq_len: int, threshold: float | None = None,
             max_near_dup_rate: float = 0.0, progress: bool = False) -> Validation:
    if progress:
        paths = tqdm(paths, desc="validating", unit="file", leave=False)
    files = [check_file(p, vocab, seq_len) for p in paths]
    items = [i for f in files for i in f.items]
    return Validation(files, near_duplicates(items, threshold), max_near_dup_rate)
