"""Text normalisation and Japanese quality filters.

All measures work on characters, not words: Japanese has no spaces, and a
morphological analyser would make cleaning an order of magnitude slower for
little gain at the thresholds used here. The measures written here are the
ones hojichar has no equivalent for (default_config.yaml says which); the
others come from hojichar (``hojichar_filters``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from kinoe_jax.corpus import hojichar_filters
from kinoe_jax.corpus.config import FilterConfig

# Every reason in the order the checks run; reports list the enabled ones in
# this order. Cheap character counts come first, hojichar's keyword lists
# (regular expressions over the whole text) last.
FILTER_REASONS = (
    "too_short",
    "low_japanese",
    "low_hiragana",
    "repetitive_ngram",
    "duplicate_lines",
    "sentence_length",
    "little_prose",
    "word_list",
    "ads",
    "bbs_comments",
    "discrimination_content",
    "violence_content",
    "adult_content",
)

# A check gets the normalised text and the same text without whitespace and
# says whether the document fails.
Check = Callable[[str, str], bool]

# Tab and newline carry layout; other C0 controls are debris from scraping.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_WHITESPACE = re.compile(r"\s+")
_HIRAGANA = re.compile(r"[\u3041-\u309f]")
# Hiragana, katakana (with extensions), CJK ideographs and Japanese
# punctuation such as 、。「」・ー.
_JAPANESE = re.compile(
    r"[\u3001-\u303f\u3041-\u309f\u30a0-\u30ff\u31f0-\u31ff"
    r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
)
# A rule drawn with one symbol ("=====", "-----" under a heading or in an ASCII chart) is layout,
# not repeated content; it is shortened to one character before the repetition measure.
_SYMBOL_RUNS = re.compile(r"([^\w])\1{4,}")
# NFKC turns ！？ into !?, so both widths are sentence ends.
_SENTENCE_END = re.compile(r"[。！？!?\n]+")


def normalize_text(text: str, nfkc: bool = True) -> str:
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def strip_whitespace(text: str) -> str:
    return _WHITESPACE.sub("", text)


def japanese_fraction(chars: str) -> float:
    return len(_JAPANESE.findall(chars)) / len(chars) if chars else 0.0


def hiragana_fraction(chars: str) -> float:
    return len(_HIRAGANA.findall(chars)) / len(chars) if chars else 0.0


def prose_chars(text: str, min_line_chars: int, min_hiragana: float) -> int:
    """Characters in lines that read as Japanese sentences: at least ``min_line_chars`` long
    (whitespace aside) with at least ``min_hiragana`` of them hiragana. Particles and endings make
    a sentence's hiragana; a table row, a command, an option name or an English line has almost
    none, so this counts the running text a page actually holds."""
    total = 0
    for line in text.split("\n"):
        chars = strip_whitespace(line)
        if len(chars) >= min_line_chars and hiragana_fraction(chars) >= min_hiragana:
            total += len(chars)
    return total


def top_ngram_share(chars: str, n: int) -> float:
    """Share of the text covered by its most frequent character n-gram.

    Overlapping occurrences are counted, so a run of one repeated character
    scores above 1; the result is capped at 1.
    """
    if len(chars) < n:
        return 0.0
    counts = Counter(chars[i:i + n] for i in range(len(chars) - n + 1))
    return min(1.0, max(counts.values()) * n / len(chars))


def duplicate_line_share(text: str) -> float:
    """Share of characters in lines that repeat an earlier line."""
    seen: set[str] = set()
    total = duplicated = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            duplicated += len(line)
        else:
            seen.add(line)
    return duplicated / total if total else 0.0


def mean_sentence_chars(text: str) -> float:
    lengths = [len(s) for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]
    return sum(lengths) / len(lengths) if lengths else 0.0


def load_word_list(path: str, nfkc: bool) -> list[str]:
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = normalize_text(line, nfkc)
        if word and not word.startswith("#"):
            words.append(word)
    return words


class QualityFilter:
    """Applies the enabled filters to normalised text, in FILTER_REASONS order."""

    def __init__(self, cfg: FilterConfig, nfkc: bool = True):
        self.cfg = cfg
        self._words: Optional[re.Pattern] = None
        if cfg.word_list_path:
            words = load_word_list(cfg.word_list_path, nfkc)
            if words:
                # Longest first so that a word is not shadowed by its prefix.
                words.sort(key=len, reverse=True)
                self._words = re.compile("|".join(map(re.escape, words)))
        # The enabled checks in run order (benchmarks time them one by one).
        self.checks: list[tuple[str, Check]] = self._build_checks()
        self.reasons = tuple(reason for reason, _ in self.checks)
        assert list(self.reasons) == [r for r in FILTER_REASONS if r in self.reasons]

    def _build_checks(self) -> list[tuple[str, Check]]:
        c = self.cfg
        checks: list[tuple[str, Check]] = []
        if c.min_chars is not None:
            # hojichar counts every character; handed the text without
            # whitespace it counts what the other filters count.
            length = hojichar_filters.length_filter(c.min_chars)
            checks.append(("too_short", lambda text, chars: hojichar_filters.rejects(length, chars)))
        if c.min_japanese_fraction is not None:
            checks.append(("low_japanese",
                           lambda text, chars: japanese_fraction(chars) < c.min_japanese_fraction))
        if c.min_hiragana_fraction is not None:
            checks.append(("low_hiragana",
                           lambda text, chars: hiragana_fraction(chars) < c.min_hiragana_fraction))
        if c.max_top_ngram_share is not None:
            checks.append(("repetitive_ngram", lambda text, chars: top_ngram_share(
                _SYMBOL_RUNS.sub(r"\1", chars), c.top_ngram_chars) > c.max_top_ngram_share))
        if c.max_duplicate_line_share is not None:
            checks.append(("duplicate_lines",
                           lambda text, chars: duplicate_line_share(text) > c.max_duplicate_line_share))
        if c.min_mean_sentence_chars is not None or c.max_mean_sentence_chars is not None:
            checks.append(("sentence_length", lambda text, chars: self._bad_sentence_length(text)))
        if c.min_prose_chars is not None:
            checks.append(("little_prose", lambda text, chars: prose_chars(
                text, c.prose_line_min_chars, c.prose_line_min_hiragana) < c.min_prose_chars))
        if self._words is not None:
            checks.append(("word_list", lambda text, chars: self.word_hits(text) > c.max_word_list_hits))
        for reason, f in hojichar_filters.content_filters(c):
            if isinstance(f, hojichar_filters.DensityFilter):
                checks.append((reason, lambda text, chars, f=f: f.rejects(text, len(chars))))
            else:
                checks.append((reason, lambda text, chars, f=f: hojichar_filters.rejects(f, text)))
        return checks

    def _bad_sentence_length(self, text: str) -> bool:
        c = self.cfg
        mean = mean_sentence_chars(text)
        return ((c.min_mean_sentence_chars is not None and mean < c.min_mean_sentence_chars)
                or (c.max_mean_sentence_chars is not None and mean > c.max_mean_sentence_chars))

    def word_hits(self, text: str) -> int:
        return len(self._words.findall(text)) if self._words else 0

    def reason(self, text: str) -> Optional[str]:
        """Name of the first failed filter, or None when the text is kept."""
        chars = strip_whitespace(text)
        for reason, fails in self.checks:
            if fails(text, chars):
                return reason
        return None
