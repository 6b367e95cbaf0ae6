"""hojichar's filters as this tool applies them.

hojichar (the Japanese corpus-cleaning library) ships curated keyword
lists and rules; they are used as they are, through hojichar's own filter
classes, rather than rewritten here. Each filter judges one
``hojichar.Document``; the tool calls ``apply`` directly rather than
through ``hojichar.Compose``, because it keeps its own counters and examples
(the report) and stops at the first failed filter, its own or hojichar's.

Which filters are on by default, and why, is in default_config.yaml.
"""

from __future__ import annotations

import re
from importlib import metadata

from hojichar import Document, Filter
from hojichar.filters.document_filters import (DiscardAds, DiscardAdultContentJa, DiscardBBSComments,
                                               DiscardDiscriminationContentJa, DiscardViolenceContentJa,
                                               DocumentLengthFilter, MaskPersonalInformation)

from kinoe_jax.corpus.config import FilterConfig

# Filter decisions change with hojichar's word lists, so reports name it.
HOJICHAR_VERSION = metadata.version("hojichar")


def rejects(f: "Filter | DensityFilter", text: str) -> bool:
    if isinstance(f, DensityFilter):
        return f.rejects(text, sum(not c.isspace() for c in text))
    return f.apply(Document(text)).is_rejected


def length_filter(min_chars: int) -> DocumentLengthFilter:
    return DocumentLengthFilter(min_doc_len=min_chars)


class DensityFilter:
    """Counts a hojichar pattern's matches and rejects a document when there are more than
    ``max_per_1000`` of them per 1,000 characters (non-whitespace, as the other filters count).

    hojichar's keyword filters drop a document on its first hit, and its BBS filter on a fixed
    count whatever the length, so a long manual or one everyday word on a list is enough.
    A density asks how much of the document the markers make up instead.
    """

    def __init__(self, pattern: re.Pattern, max_per_1000: float):
        self.pattern = pattern
        self.max_per_1000 = max_per_1000

    def hits(self, text: str) -> int:
        return sum(1 for _ in self.pattern.finditer(text))

    def per_1000(self, text: str, num_chars: int) -> float:
        return 1000.0 * self.hits(text) / max(num_chars, 1)

    def rejects(self, text: str, num_chars: int) -> bool:
        return self.per_1000(text, num_chars) > self.max_per_1000


def bbs_pattern() -> re.Pattern:
    """hojichar's bulletin-board markers without its bare hyphen: every option of a manual page
    ("--help") and every hyphenated word counted as a marker, so documentation scored like a
    comment thread. Dates, (月), 投稿, コメント, レビュー, 質問, ページ and the rest stay."""
    alternatives = DiscardBBSComments().keyword_pat.pattern.split("|")
    return re.compile("|".join(a for a in alternatives if a != "-"))


def content_filters(cfg: FilterConfig) -> list[tuple[str, Filter | DensityFilter]]:
    """(reason, filter) for each enabled content filter, cheapest first."""
    found: list[tuple[str, Filter | DensityFilter]] = []
    if cfg.max_ad_keywords is not None:
        found.append(("ads", DiscardAds(max_allowed_num=cfg.max_ad_keywords)))
    if cfg.max_bbs_markers is not None:  # hojichar's own rule: a count, whatever the length
        found.append(("bbs_comments", DiscardBBSComments(max_allowed_num=cfg.max_bbs_markers)))
    elif cfg.max_bbs_markers_per_1000 is not None:
        found.append(("bbs_comments", DensityFilter(bbs_pattern(), cfg.max_bbs_markers_per_1000)))
    keywords = {"ignore_confused": cfg.katakana_keyword_boundary}
    for reason, enabled, cls in (("discrimination_content", cfg.discrimination_content, DiscardDiscriminationContentJa),
                                 ("violence_content", cfg.violence_content, DiscardViolenceContentJa),
                                 ("adult_content", cfg.adult_content, DiscardAdultContentJa)):
        if enabled:
            found.append((reason, DensityFilter(cls(**keywords).keyword_pat, cfg.max_keyword_hits_per_1000)))
    return found


# Two Japanese phone formats hojichar's pattern leaves whole: an area code in brackets,
# "(03)1234-5678", and toll-free numbers, "0120-123-456" (three digits last). Their last group is
# masked the way hojichar masks the others.
_MORE_PHONES = re.compile(r"(?<![\d(])(\(0\d{1,4}\) ?\d{1,4}-|0(?:120|800)-?\d{3}-?)(\d{3,4})(?!\d)")


class PiiMasker:
    """Masks phone numbers and e-mail addresses with hojichar's
    MaskPersonalInformation (plus the two phone formats above) and counts what it masked."""

    def __init__(self) -> None:
        self._filter = MaskPersonalInformation()

    def mask(self, text: str) -> tuple[str, int, int]:
        """(masked text, phone numbers masked, e-mail addresses masked)."""
        masked = self._filter.apply(Document(text)).text
        masked, more = _MORE_PHONES.subn(lambda m: m.group(1) + "X" * len(m.group(2)), masked)
        if masked == text:
            return text, 0, 0
        # hojichar substitutes without counting; its own patterns count the
        # matches, and only for the few documents that changed.
        phones = len(self._filter.phone_pat.findall(text)) + more
        emails = len(self._filter.email_pat.findall(text))
        return masked, phones, emails
