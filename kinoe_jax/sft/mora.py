"""Mora (拍) counts of Japanese lines, for checking that senryu scan 5-7-5.

Readings come from the morphological analyser MeCab with the UniDic dictionary (PyPI: fugashi and
unidic-lite). Counting follows the usual rules for verse: a small ャ/ュ/ョ/ァ/ィ/ゥ/ェ/ォ/ヮ joins
the kana before it, while ッ, ン and ー each count as one. Where the analyser picks the wrong
reading of a word, the item supplies the reading itself (`readings`: surface -> kana).
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata

_SMALL = set("ャュョァィゥェォヮ")


class ReadingError(ValueError):
    pass


def to_katakana(text: str) -> str:
    return "".join(chr(ord(c) + 0x60) if "ぁ" <= c <= "ゖ" else c for c in text)


def is_kana(text: str) -> bool:
    return bool(text) and all("ァ" <= c <= "ヺ" or c == "ー" for c in to_katakana(text))


def _silent(text: str) -> bool:
    """Punctuation, symbols and spaces are not pronounced."""
    return all(unicodedata.category(c)[0] in "PSZ" for c in text)


def count_kana(kana: str) -> int:
    kana = to_katakana(kana)
    if not is_kana(kana):
        raise ReadingError(f"{kana!r} is not a kana reading")
    return sum(1 for c in kana if c not in _SMALL)


@functools.lru_cache(maxsize=1)
def _tagger():
    try:
        import fugashi  # noqa: PLC0415 (optional: the ja extra)
    except ImportError as e:
        raise ImportError("mora counting needs `pip install fugashi unidic-lite`") from e
    return fugashi.Tagger()


@dataclasses.dataclass(frozen=True)
class Reading:
    surface: str
    kana: str  # "" for punctuation
    source: str  # "analyser", "override", "kana" (read as written) or "silent"

    @property
    def morae(self) -> int:
        return count_kana(self.kana) if self.kana else 0


def read_line(line: str, overrides: dict[str, str] | None = None) -> list[Reading]:
    """Word-by-word readings of one line; an override's surface is read as given."""
    overrides = overrides or {}
    out: list[Reading] = []
    for part, forced in _split(line, overrides):
        if forced:
            out.append(Reading(part, to_katakana(overrides[part]), "override"))
            continue
        for word in _tagger()(part):
            surface = word.surface
            kana = getattr(word.feature, "kana", None)
            if kana and kana != "*" and is_kana(kana):
                out.append(Reading(surface, kana, "analyser"))
            elif is_kana(surface):
                out.append(Reading(surface, to_katakana(surface), "kana"))
            elif _silent(surface):
                out.append(Reading(surface, "", "silent"))
            else:
                raise ReadingError(f"no reading for {surface!r} in {line!r}; give one in the item's "
                                   f"'readings' (e.g. {{{surface!r}: 'よみ'}})")
    return out


def count_line(line: str, overrides: dict[str, str] | None = None) -> int:
    return sum(r.morae for r in read_line(line, overrides))


def _split(line: str, overrides: dict[str, str]) -> list[tuple[str, bool]]:
    """The line cut around override surfaces (longest first), flagged True where one applies."""
    parts = [(line, False)]
    for surface in sorted(overrides, key=len, reverse=True):
        nxt: list[tuple[str, bool]] = []
        for text, forced in parts:
            if forced or surface not in text:
                nxt.append((text, forced))
                continue
            pieces = text.split(surface)
            for i, piece in enumerate(pieces):
                if piece:
                    nxt.append((piece, False))
                if i < len(pieces) - 1:
                    nxt.append((surface, True))
        parts = nxt
    return parts
