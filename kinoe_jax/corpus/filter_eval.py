"""Each filter's precision and recall against hand labels, and what it removes from each source.

A filter is judged alone (would it remove this document?) and the chain as it runs (does the
document survive every enabled filter?). Precision: of the labelled documents a filter removes,
the share labelled "drop". Recall: of those labelled "drop", the share it removes. Documents go
through the same normalisation and masking as in tools/prepare_corpus.py; deduplication is not a
quality filter and is left out.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

from kinoe_jax.corpus.config import CorpusConfig
from kinoe_jax.corpus.filters import QualityFilter, normalize_text, strip_whitespace
from kinoe_jax.corpus.hojichar_filters import PiiMasker
from kinoe_jax.corpus.labels import Label


@dataclass
class FilterScore:
    reason: str
    removed_labelled: int = 0
    removed_drop: int = 0
    removed_by_package: Counter = field(default_factory=Counter)

    def precision(self) -> Optional[float]:
        return self.removed_drop / self.removed_labelled if self.removed_labelled else None


@dataclass
class Evaluation:
    filters: list[FilterScore]
    docs_by_package: Counter
    labelled_keep: int
    labelled_drop: int
    chain_kept_keep: int  # "keep" documents that pass every filter
    chain_removed_drop: int
    chain_removed_by_package: Counter
    lost_keep: list[tuple[str, str]]  # "keep" documents the chain removes, and the filter that did
    missed_drop: Counter  # drop reasons the chain let through

    def recall(self, score: FilterScore) -> float:
        return score.removed_drop / self.labelled_drop if self.labelled_drop else 0.0


def evaluate(docs: Iterable[tuple[str, str, str]], labels: dict[str, Label], cfg: CorpusConfig) -> Evaluation:
    """``docs``: (id, package, text) of the whole corpus; ``labels`` name some of them."""
    quality = QualityFilter(cfg.filters, cfg.normalize.nfkc)
    masker = PiiMasker() if cfg.pii.mask else None
    scores = {reason: FilterScore(reason) for reason in quality.reasons}
    by_package: Counter = Counter()
    chain_by_package: Counter = Counter()
    kept_keep = removed_drop = 0
    lost: list[tuple[str, str]] = []
    missed: Counter = defaultdict(int)
    for doc_id, package, raw in docs:
        text = normalize_text(raw, cfg.normalize.nfkc)
        if masker is not None:
            text = masker.mask(text)[0]
        chars = strip_whitespace(text)
        by_package[package] += 1
        label = labels.get(doc_id)
        first = None
        for reason, fails in quality.checks:
            if not fails(text, chars):
                continue
            first = first or reason
            score = scores[reason]
            score.removed_by_package[package] += 1
            if label is not None:
                score.removed_labelled += 1
                score.removed_drop += not label.keep
        if first is not None:
            chain_by_package[package] += 1
        if label is None:
            continue
        if label.keep and first is None:
            kept_keep += 1
        elif label.keep:
            lost.append((doc_id, first))
        elif first is not None:
            removed_drop += 1
        else:
            missed[label.reason] += 1
    keep_total = sum(label.keep for label in labels.values())
    return Evaluation(list(scores.values()), by_package, keep_total, len(labels) - keep_total, kept_keep,
                      removed_drop, chain_by_package, lost, Counter(missed))


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(ev: Evaluation, packages: tuple[str, ...]) -> str:
    head = ["filter (alone)", "removes (labelled)", "precision", "recall"] + [f"{p} removed" for p in packages]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in ev.filters:
        cells = [s.reason, str(s.removed_labelled), _pct(s.precision()), _pct(ev.recall(s))]
        cells += [_pct(s.removed_by_package[p] / ev.docs_by_package[p]) if ev.docs_by_package[p] else "-"
                  for p in packages]
        rows.append("| " + " | ".join(cells) + " |")
    chain = ["**the chain**", str(ev.chain_removed_drop + len(ev.lost_keep)),
             _pct((ev.chain_removed_drop / (ev.chain_removed_drop + len(ev.lost_keep)))
                  if ev.chain_removed_drop + len(ev.lost_keep) else None),
             _pct(ev.chain_removed_drop / ev.labelled_drop if ev.labelled_drop else None)]
    chain += [_pct(ev.chain_removed_by_package[p] / ev.docs_by_package[p]) if ev.docs_by_package[p] else "-"
              for p in packages]
    rows.append("| " + " | ".join(chain) + " |")
    keep_rate = ev.chain_kept_keep / ev.labelled_keep if ev.labelled_keep else 0.0
    drop_rate = ev.chain_removed_drop / ev.labelled_drop if ev.labelled_drop else 0.0
    lines = ["\n".join(rows), "",
             f"labelled: {ev.labelled_keep} keep, {ev.labelled_drop} drop; the chain keeps "
             f"{ev.chain_kept_keep}/{ev.labelled_keep} keep ({_pct(keep_rate)}, goal >= 98%) and removes "
             f"{ev.chain_removed_drop}/{ev.labelled_drop} drop ({_pct(drop_rate)}, goal >= 90%)"]
    if ev.lost_keep:
        lines.append("keep documents the chain removes: " + ", ".join(
            f"{doc_id} ({reason})" for doc_id, reason in ev.lost_keep))
    if ev.missed_drop:
        lines.append("drop documents it lets through, by reason: " + ", ".join(
            f"{reason} {n}" for reason, n in ev.missed_drop.most_common()))
    return "\n".join(lines)

