"""Plain text out of the two markups Debian's documentation is written in: HTML (DocBook output)
and roff man pages.

Only the words a reader sees are kept. Navigation bars, tables of contents, scripts and styles
are dropped, because a corpus of help pages would otherwise repeat "前へ / 次へ / ホーム" and the
same chapter list on every page. Line breaks inside a paragraph are joined the way a Japanese
reader sees them: without a space between two Japanese characters, with one between two Latin
words.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Optional

_SPACE_RUN = re.compile(r"[ \t\r\n\f\v]+")
_BLOCK_TAGS = frozenset(
    "p div h1 h2 h3 h4 h5 h6 li dt dd tr table pre br blockquote ul ol dl title section caption hr td th".split())
# DocBook's chrome: page links, the chapter lists and the index are on every page or are only links.
_SKIP_CLASSES = frozenset(
    "navheader navfooter toc list-of-figures list-of-tables list-of-examples breadcrumbs index".split())
_SKIP_TAGS = frozenset(("script", "style", "head", "noscript"))
_HEADINGS = ("h1", "h2", "h3")


def _wide(ch: str) -> bool:
    return ord(ch) >= 0x2E80  # CJK, kana, full-width forms


def join_lines(parts: list[str]) -> str:
    """One paragraph from wrapped lines: no space where a line break falls between two Japanese
    characters (Japanese is written without spaces), one space everywhere else."""
    out = ""
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if out and not (_wide(out[-1]) and _wide(part[0])):
            out += " "
        out += part
    return out


def _collapse(text: str) -> str:
    """Whitespace as a browser shows it, except that a line break between Japanese characters goes."""
    pieces = _SPACE_RUN.split(text.strip())
    gaps = _SPACE_RUN.findall(text.strip())
    out = pieces[0]
    for gap, piece in zip(gaps, pieces[1:]):
        if not ("\n" in gap and out and piece and _wide(out[-1]) and _wide(piece[0])):
            out += " "
        out += piece
    return out


class _Page(HTMLParser):
    """Collects (heading anchor, heading text, paragraphs) sections of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list] = [[None, "", []]]
        self._skip_stack: list[str] = []  # open tags of a skipped subtree
        self._pre = 0
        self._buffer: list[str] = []
        self._heading: Optional[str] = None
        self._anchor: Optional[str] = None

    def _flush(self) -> None:
        raw = "".join(self._buffer)
        self._buffer = []
        if self._pre:
            text = "\n".join(line.rstrip() for line in raw.strip("\n").split("\n"))
        else:
            text = _collapse(raw)
        if text:
            self.sections[-1][2].append(text)

    def handle_starttag(self, tag, attrs):
        if self._skip_stack:
            if tag not in ("br", "hr", "img", "meta", "link", "input", "col"):
                self._skip_stack.append(tag)
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES:
            self._skip_stack.append(tag)
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "pre":
            self._pre += 1
        if tag in _HEADINGS:
            self._heading, self._anchor = tag, None
        if tag == "a" and self._heading and self._anchor is None:
            self._anchor = dict(attrs).get("id")

    def handle_startendtag(self, tag, attrs):
        if tag == "a" and self._heading and not self._skip_stack and self._anchor is None:
            self._anchor = dict(attrs).get("id")
        elif tag in ("br", "hr") and not self._skip_stack:
            self._flush()

    def handle_endtag(self, tag):
        if self._skip_stack:
            if self._skip_stack[-1] == tag:
                self._skip_stack.pop()
            return
        if tag == self._heading:
            title = _collapse("".join(self._buffer))
            self._buffer = []
            self._heading = None
            self.sections.append([self._anchor, title, [title] if title else []])
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "pre" and self._pre:
            self._pre -= 1

    def handle_data(self, data):
        if not self._skip_stack:
            self._buffer.append(data)

    def close(self):
        super().close()
        self._flush()


def html_sections(html: str) -> list[tuple[Optional[str], str, str]]:
    """(anchor, title, text) per h1-h3 section of a page; the part before the first heading has
    anchor None. Empty sections are left out."""
    page = _Page()
    page.feed(html)
    page.close()
    out = []
    for anchor, title, paragraphs in page.sections:
        text = "\n".join(paragraphs).strip()
        if text:
            out.append((anchor, title, text))
    return out


def html_text(html: str) -> str:
    return "\n".join(text for _, _, text in html_sections(html))


# ----------------------------------------------------------------------------- roff (man pages)
_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_SIZE = re.compile(r"\\s[+-]?\d+|\\s\[[^\]]*\]")
_STRING = re.compile(r"\\\*(\(..|\[[^\]]*\]|.)")
_NAMED = {"em": "—", "en": "–", "aq": "'", "lq": "“", "rq": "”", "dq": '"', "bu": "・", "co": "©",
          "hy": "-", "mi": "-", "ti": "~", "ha": "^", "rs": "\\", "oq": "'", "cq": "'", "mu": "×",
          "<=": "≤", ">=": "≥", "->": "→", "<-": "←", "de": "°", "tm": "™", "rg": "®"}
_CHAR = re.compile(r"\\\((..)|\\\[([^\]]*)\]")
_ZERO_WIDTH = re.compile(r"\\[&,/|^)c%:]|\\$")
_ALTERNATING = frozenset(("BR", "RB", "IR", "RI", "BI", "IB"))
_TEXT_MACROS = frozenset(("B", "I", "SM", "SB"))
_BREAKS = frozenset(("PP", "P", "LP", "TP", "HP", "sp", "br", "RS", "RE", "IP", "TQ", "in", "ti", "bp",
                     "Pp", "Lp", "It", "Bl", "El", "Bd", "Ed"))
# BSD mdoc macros that print their arguments (and may carry further such macro names inside them).
_MDOC_INLINE = frozenset(
    "Nm Nd Fl Ar Op Oo Oc Xr Pa Cm Ic Li Em Sy Dq Qq Sq Pq Va Ev Dv Er Fn Fa Ft Fo Fc Ql No Ns Tn Ux At Bx An Lk Mt "
    "Aq Bq Brq Dl D1 Ad Cd Ms Ot St Rv Ex Ta Xo Xc Bo Bc Do Dc Po Pc Qo Qc So Sc Eo Ec Sx Vt In Lb".split())


def _unescape(line: str) -> str:
    line = _FONT.sub("", line)
    line = _SIZE.sub("", line)
    line = _STRING.sub("", line)
    line = _CHAR.sub(lambda m: _NAMED.get(m.group(1) or m.group(2), ""), line)
    line = _ZERO_WIDTH.sub("", line)
    line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ")
    line = line.replace("\\0", " ").replace("\\t", " ")
    return re.sub(r"\\(.)", r"\1", line)


def _macro_args(rest: str) -> list[str]:
    args = re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)
    return [quoted.replace('""', '"') if quoted else bare for quoted, bare in args]


def roff_text(source: str) -> Optional[str]:
    """The visible text of a man page, a paragraph per line; None for a page that only points at
    another one (``.so``)."""
    paragraphs: list[str] = []
    current: list[str] = []
    no_fill = table_format = False
    page_name = ""

    def flush() -> None:
        if current:
            paragraphs.append(join_lines(current))
            current.clear()

    skip_until = None  # the line that ends an ignored block (.ig) or a macro definition (.de)
    for line in source.split("\n"):
        if skip_until is not None:
            if line.strip() == skip_until:
                skip_until = None
            continue
        if line.startswith((".\\\"", "'\\\"", "\\\"", ".\\#")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            args = _macro_args(rest)
            if name == "so":
                return None
            if name in ("ig", "de", "de1", "am", "ami"):
                end = args[1] if len(args) > 1 else ""
                skip_until = "." + (end or ".") if name != "ig" else "." + (args[0] if args else ".")
                continue
            if name in ("SH", "SS", "Sh", "Ss"):
                flush()
                paragraphs.append(_unescape(" ".join(args)))
            elif name in _MDOC_INLINE:
                if name == "Nm":
                    page_name = page_name or (args[0] if args else "")
                    args = args or [page_name]
                words = [a for a in args if a not in _MDOC_INLINE]
                if name == "Nd":
                    words = ["-"] + words
                current.append(_unescape(" ".join(words)))
            elif name in _TEXT_MACROS:
                current.append(_unescape(" ".join(args)))
            elif name in _ALTERNATING:
                current.append(_unescape("".join(args)))
            elif name in ("nf", "EX"):
                flush()
                no_fill = True
            elif name in ("fi", "EE"):
                no_fill = False
            elif name == "TS":
                flush()
                no_fill = table_format = True
            elif name == "TE":
                no_fill = table_format = False
            elif name in _BREAKS:
                flush()
                if name == "It" and args:
                    current.append(_unescape(" ".join(a for a in args if a not in _MDOC_INLINE)))
                if name == "IP" and args and args[0] not in ("", "\\(bu", "\\(em", "-"):
                    paragraphs.append(_unescape(args[0]))
            continue
        if table_format:  # tbl's column spec ends with a line that ends with '.'
            table_format = not line.rstrip().endswith(".")
            continue
        text = _unescape(line)
        if no_fill:
            flush()
            if text.strip():
                paragraphs.append(re.sub(r"[ \t]+", " ", text).strip())
        else:
            current.append(text)
    flush()
    return "\n".join(p for p in paragraphs if p.strip())
