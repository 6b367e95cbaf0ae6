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

from importlib import metadata

from hojichar import Document, Filter
from hojichar.filters.document_filters import (DiscardAds, DiscardAdultContentJa, DiscardBBSComments,
                                               DiscardDiscriminationContentJa, DiscardViolenceContentJa,
                                               DocumentLengthFilter, MaskPersonalInformation)

from kinoe_jax.corpus.config import FilterConfig

# Filter decisions change with hojichar's word lists, so reports name it.
HOJICHAR_VERSION = metadata.version("hojichar")


def rejects(f: Filter, text: str) -> bool:
    return f.apply(Document(text)).is_rejected


def length_filter(min_chars: int) -> DocumentLengthFilter:
    return DocumentLengthFilter(min_doc_len=min_chars)


def content_filters(cfg: FilterConfig) -> list[tuple[str, Filter]]:
    """(reason, filter) for each enabled content filter, cheapest first."""
    found: list[tuple[str, Filter]] = []
    if cfg.max_ad_keywords is not None:
        found.append(("ads", DiscardAds(max_allowed_num=cfg.max_ad_keywords)))
    if cfg.max_bbs_markers is not None:
        found.append(("bbs_comments", DiscardBBSComments(max_allowed_num=cfg.max_bbs_markers)))
    keywords = {"ignore_confused": cfg.katakana_keyword_boundary}
    if cfg.discrimination_content:
        found.append(("discrimination_content", DiscardDiscriminationContentJa(**keywords)))
    if cfg.violence_content:
        found.append(("violence_content", DiscardViolenceContentJa(**keywords)))
    if cfg.adult_content:
        found.append(("adult_content", DiscardAdultContentJa(**keywords)))
    return found


class PiiMasker:
    """Masks phone numbers and e-mail addresses with hojichar's
    MaskPersonalInformation and counts what it masked."""

    def __init__(self) -> None:
        self._filter = MaskPersonalInformation()

    def mask(self, text: str) -> tuple[str, int, int]:
        """(masked text, phone numbers masked, e-mail addresses masked)."""
        masked = self._filter.apply(Document(text)).text
        if masked == text:
            return text, 0, 0
        # hojichar substitutes without counting; its own patterns count the
        # matches, and only for the few documents that changed.
        phones = len(self._filter.phone_pat.findall(text))
        emails = len(self._filter.email_pat.findall(text))
        return masked, phones, emails
