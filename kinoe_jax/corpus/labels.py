"""Hand labels of corpus documents, by document id: the yardstick the filters are measured against.

A labels file is UTF-8 text, one document a line, tab-separated: the document id, ``keep`` or
``drop``, and for ``drop`` the reason. Lines starting with ``#`` are notes. Only ids are stored,
never text, so a file can label a corpus that the project may not ship.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from kinoe_jax.utils.errors import InputError

LABELS_DIR = Path(__file__).with_name("labels")
DEBIAN_DOCS_LABELS = LABELS_DIR / "debian_docs_ja.tsv"
# Why a document is not wanted; the note at the top of the labels file says how each is judged.
DROP_REASONS = ("not_japanese", "code_or_table", "option_list", "boilerplate", "too_short")


@dataclass(frozen=True)
class Label:
    keep: bool
    reason: str  # empty for keep


def load_labels(path: str | Path) -> dict[str, Label]:
    labels: dict[str, Label] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"labels {path}: cannot be read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        where = f"labels {path}:{number}"
        if len(fields) not in (2, 3) or fields[1] not in ("keep", "drop"):
            raise InputError(f"{where}: expected 'id<TAB>keep' or 'id<TAB>drop<TAB>reason', got {line!r}")
        doc_id, verdict, reason = fields[0], fields[1], (fields[2] if len(fields) == 3 else "")
        if verdict == "drop" and reason not in DROP_REASONS:
            raise InputError(f"{where}: drop reason {reason!r} is not one of {', '.join(DROP_REASONS)}")
        if verdict == "keep" and reason:
            raise InputError(f"{where}: a keep label has no reason, got {reason!r}")
        if doc_id in labels:
            raise InputError(f"{where}: {doc_id} is labelled twice")
        labels[doc_id] = Label(verdict == "keep", reason)
    if not labels:
        raise InputError(f"labels {path}: no labels")
    return labels


def check_ids(labels: dict[str, Label], corpus_ids: Iterable[str], path: str | Path) -> None:
    """Every labelled id must be a document of the corpus: a label for a page that is not there
    (another version of a package, a typo) would silently shrink the sample."""
    known = set(corpus_ids)
    missing = [doc_id for doc_id in labels if doc_id not in known]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"labels {path}: document id {missing[0]!r}{more} is not in the corpus")
