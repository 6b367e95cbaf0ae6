"""Per-line work shared by the local and the Beam runner: parse, normalise,
mask personal information, filter, and compute the dedup keys of one JSONL
line. Both runners call ``LineProcessor``, so they apply the same filters.

Everything here depends on the line alone, so it can run on any worker; the
decisions that need the whole corpus (dedup) are taken elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NamedTuple, Optional

from kinoe_jax.corpus.config import CorpusConfig
from kinoe_jax.corpus.dedup import Signer, exact_key, lsh_params
from kinoe_jax.corpus.filters import QualityFilter, normalize_text
from kinoe_jax.corpus.hojichar_filters import HOJICHAR_VERSION, PiiMasker
from kinoe_jax.corpus.report import DEDUP_REASONS, snippet, snippet_at

BAD, REMOVED, DOC = "bad", "removed", "doc"
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Settings:
    config: CorpusConfig
    text_field: str = "text"


class Outcome(NamedTuple):
    kind: str  # BAD, REMOVED or DOC
    reason: str  # bad-input or filter reason; empty for DOC
    example: str  # shortened text (or raw line) for the report
    nbytes: int
    nchars: int = 0
    key: bytes = b""  # exact-dedup key
    signature: bytes = b""  # MinHash values, empty when near dedup is off
    line: bytes = b""  # output JSONL line
    phones: int = 0  # phone numbers masked
    emails: int = 0  # e-mail addresses masked
    pii_example: str = ""  # the masked text around the first mask


def removal_reasons(cfg: CorpusConfig) -> tuple[str, ...]:
    """The enabled filters and dedup steps, in the order they run."""
    dedup = tuple(r for r, on in zip(DEDUP_REASONS, (cfg.dedup.exact, cfg.dedup.near)) if on)
    return QualityFilter(cfg.filters, cfg.normalize.nfkc).reasons + dedup


def run_facts(cfg: CorpusConfig) -> dict[str, Any]:
    """What, besides the config, decides which documents a run keeps."""
    bands, rows = lsh_params(cfg.dedup)
    return {
        "lsh": {"bands": bands, "rows_per_band": rows},
        "libraries": {"hojichar": HOJICHAR_VERSION, "datasketch": metadata.version("datasketch")},
        "config": cfg.to_dict(),
    }


class LineProcessor:
    def __init__(self, settings: Settings):
        cfg = settings.config
        self.settings = settings
        self.filter = QualityFilter(cfg.filters, cfg.normalize.nfkc)
        self.masker = PiiMasker() if cfg.pii.mask else None
        self.signer = Signer(cfg.dedup) if cfg.dedup.near else None
        self.example_chars = cfg.report.example_chars

    def _bad(self, reason: str, raw: bytes) -> Outcome:
        shown = raw.decode("utf-8", errors="backslashreplace")
        if self.masker:
            # A broken line can hold personal information like any other.
            shown = self.masker.mask(shown)[0]
        return Outcome(BAD, reason, snippet(shown, self.example_chars), len(raw))

    def process(self, raw: bytes) -> Outcome:
        nbytes = len(raw)
        try:
            line = raw.removeprefix(_BOM).decode("utf-8")
        except UnicodeDecodeError:
            return self._bad("invalid_utf8", raw)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return self._bad("invalid_json", raw)
        field = self.settings.text_field
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            return self._bad("missing_field", raw)
        cfg = self.settings.config
        text = normalize_text(record[field], cfg.normalize.nfkc)
        if not text:
            return self._bad("empty_document", raw)
        phones = emails = 0
        pii_example = ""
        if self.masker:
            original = text
            text, phones, emails = self.masker.mask(text)
            if text is not original:
                first = next((i for i, (a, b) in enumerate(zip(original, text)) if a != b),
                             min(len(original), len(text)))
                pii_example = snippet_at(text, first, self.example_chars)
        example = snippet(text, self.example_chars)
        reason = self.filter.reason(text)
        if reason is not None:
            return Outcome(REMOVED, reason, example, nbytes, len(text))
        record[field] = text
        try:
            out = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:
            # Valid UTF-8 bytes can still carry lone surrogates as \ud8xx
            # escapes; they cannot be written back as UTF-8.
            return self._bad("invalid_utf8", raw)
        signature = self.signer.signature(text) if self.signer else b""
        return Outcome(DOC, "", example, nbytes, len(text), exact_key(text), signature, out,
                       phones, emails, pii_example)


# Multiprocessing workers build their processor once, in the initializer.
_worker: Optional[LineProcessor] = None


def init_worker(settings: Settings) -> None:
    global _worker
    _worker = LineProcessor(settings)


def process_chunk(lines: list[bytes]) -> list[Outcome]:
    assert _worker is not None, "init_worker was not called"
    return [_worker.process(raw) for raw in lines]
