"""Counts and examples of what the cleaning did, as JSON and as text.

Both runners produce the same report layout, so a Beam run can be compared
with a local run key by key.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Optional, Sequence

BAD_INPUT_REASONS = ("invalid_json", "missing_field", "invalid_utf8", "empty_document", "unreadable_file")
DEDUP_REASONS = ("exact_duplicate", "near_duplicate")
# Totals summed over all lines; everything else in a report is derived.
TOTAL_KEYS = ("lines_read", "bytes_in", "documents_in", "chars_in", "documents_out", "chars_out")
# Masks in the documents written, summed like the totals.
PII_KEYS = ("documents_masked", "phone_numbers", "email_addresses")
PII_EXAMPLES = "pii_masked"


def snippet(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def snippet_at(text: str, index: int, limit: int) -> str:
    """About ``limit`` characters of ``text`` around ``index`` (a mask deep
    inside a document would not show in its opening characters)."""
    start = max(0, index - limit // 2)
    shown = snippet(text[start:], limit)
    return "…" + shown if start else shown


def example(source: str, text: str, duplicate_of: Optional[str] = None) -> dict[str, str]:
    entry = {"source": source, "text": text}
    if duplicate_of is not None:
        entry["duplicate_of"] = duplicate_of
    return entry


class Tally:
    """Running counts for the local runner; examples are the first ones in
    input order, so they are the same whatever the worker count."""

    def __init__(self, examples_per_reason: int):
        self.examples_per_reason = examples_per_reason
        self.totals: Counter = Counter()
        self.reasons: Counter = Counter()
        self.examples: dict[str, list[dict]] = defaultdict(list)

    def count(self, reason: str, entry: dict[str, str]) -> None:
        self.reasons[reason] += 1
        self.show(reason, entry)

    def show(self, key: str, entry: dict[str, str]) -> None:
        if len(self.examples[key]) < self.examples_per_reason:
            self.examples[key].append(entry)


def build_report(totals: dict[str, int], reasons: dict[str, int], examples: dict[str, list[dict]],
                 removal_reasons: Sequence[str], mask_pii: bool, **meta: Any) -> dict[str, Any]:
    """``removal_reasons``: the enabled filters and dedup steps, in run order;
    a disabled one gets no counter, so a 0 always means "ran, removed none"."""
    report: dict[str, Any] = {key: int(totals.get(key, 0)) for key in TOTAL_KEYS}
    report["bad_input"] = {r: int(reasons.get(r, 0)) for r in BAD_INPUT_REASONS}
    report["removed"] = {r: int(reasons.get(r, 0)) for r in removal_reasons}
    if mask_pii:
        report["pii"] = {k: int(totals.get("pii_" + k, 0)) for k in PII_KEYS}
    shown = BAD_INPUT_REASONS + tuple(removal_reasons) + ((PII_EXAMPLES,) if mask_pii else ())
    report["examples"] = {r: examples[r] for r in shown if examples.get(r)}
    report.update(meta)
    return report


def _line(label: str, value: int, indent: int = 2) -> str:
    return f"{' ' * indent}{label:<{30 - indent}}{value:>14,}"


def format_report(report: dict[str, Any]) -> str:
    seconds = report.get("elapsed_seconds", 0.0)
    workers = report.get("num_workers")
    workers = f"{workers} worker(s)" if isinstance(workers, int) else "workers managed by Beam"
    out = [f"prepare_corpus: {report.get('runner', '?')} runner, {workers}, {seconds:.1f} s"]
    out.append(_line("input files", len(report.get("inputs", []))))
    out.append(_line("lines read", report["lines_read"]))
    out.append(_line("bad input", sum(report["bad_input"].values())))
    out += [_line(r, n, 4) for r, n in report["bad_input"].items() if n]
    out.append(_line("documents in", report["documents_in"]))
    removed = report["removed"]
    filters = [r for r in removed if r not in DEDUP_REASONS]
    dedup = [r for r in removed if r in DEDUP_REASONS]
    out.append(_line("removed by filters", sum(removed[r] for r in filters)))
    out += [_line(r, removed[r], 4) for r in filters]
    out.append(_line("removed as duplicates", sum(removed[r] for r in dedup)))
    out += [_line(r, removed[r], 4) for r in dedup]
    kept = report["documents_out"]
    share = 100.0 * kept / report["documents_in"] if report["documents_in"] else 0.0
    out.append(_line("documents out", kept) + f"  ({share:.1f}% of documents in)")
    if "pii" in report:
        out.append("  personal information masked in the documents out:")
        out += [_line(k.replace("_", " "), n, 4) for k, n in report["pii"].items()]
    if seconds > 0:
        out.append(f"  throughput: {report['documents_in'] / seconds:,.0f} documents/s, "
                   f"{report['bytes_in'] / seconds / 1e6:.2f} MB/s of input")
    if "output_dir" in report:
        out.append(f"  output: {report['output_dir']} ({report.get('shards', '?')} shard(s))")
    if report["examples"]:
        out.append("examples:")
        for reason, entries in report["examples"].items():
            out.append(f"  {reason}:")
            for e in entries:
                dup = f"  [duplicate of {e['duplicate_of']}]" if "duplicate_of" in e else ""
                out.append(f"    {e['source']}: {e['text']}{dup}")
    return "\n".join(out)
