"""Debian's Japanese documentation, as installed, turned into corpus documents.

Real Japanese that nobody on the team wrote: the filters are measured on it (labels/ and
tools/bench/bench_filters_real_text.py) and the ja_docs run trains on it. The text is read from
the installed packages on each machine and never shipped with the project; a document's id is its
package and installed path (and, for the Debian Reference, the section's anchor), so labels and
reports can name documents without quoting them.

One document per man page, per GIMP help page, and per Debian Reference section (its chapters are
whole books' worth of text in one file).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

from kinoe_jax.corpus.markup_text import html_sections, html_text, roff_text
from kinoe_jax.utils.errors import InputError

PACKAGES = ("manpages-ja", "gimp-help-ja", "debian-reference-ja")
DPKG_INFO = "/var/lib/dpkg/info"


class PackagesMissing(InputError):
    pass


@dataclass(frozen=True)
class Document:
    id: str
    package: str
    text: str

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "package": self.package, "text": self.text}, ensure_ascii=False)


def package_files(package: str, dpkg_info: Optional[str] = None) -> Optional[list[str]]:
    """The files dpkg installed for ``package``, sorted; None when it is not installed."""
    dpkg_info = dpkg_info or DPKG_INFO
    lists = sorted(glob.glob(os.path.join(dpkg_info, f"{package}.list"))
                   + glob.glob(os.path.join(dpkg_info, f"{package}:*.list")))
    if not lists:
        return None
    files: set[str] = set()
    for path in lists:
        with open(path, encoding="utf-8", errors="replace") as f:
            files.update(line.strip() for line in f if line.strip())
    return sorted(p for p in files if os.path.isfile(p) and not os.path.islink(p))


def require(packages: tuple[str, ...], dpkg_info: Optional[str] = None) -> dict[str, list[str]]:
    """Each package's files; one line naming every missing package (and how to get them) otherwise."""
    found = {p: package_files(p, dpkg_info) for p in packages}
    missing = [p for p, files in found.items() if files is None]
    if missing:
        raise PackagesMissing(f"not installed: {', '.join(missing)} "
                              f"(install them with: apt-get install -y {' '.join(packages)})")
    return found


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few old pages are still in EUC-JP
        return data.decode("euc-jp", errors="replace")


def _man_pages(package: str, files: list[str]) -> Iterator[Document]:
    for path in files:
        if "/man/" not in path or not os.path.basename(path).split(".")[1:2]:
            continue
        text = roff_text(_read(path))
        if text:
            yield Document(f"{package}:{path}", package, text)


def _html_pages(package: str, files: list[str], split_sections: bool) -> Iterator[Document]:
    for path in files:
        if not path.endswith(".html"):
            continue
        html = _read(path)
        if not split_sections:
            text = html_text(html)
            if text:
                yield Document(f"{package}:{path}", package, text)
            continue
        for i, (anchor, _, text) in enumerate(html_sections(html)):
            yield Document(f"{package}:{path}#{anchor or i}", package, text)


def documents(packages: tuple[str, ...] = PACKAGES, dpkg_info: Optional[str] = None) -> Iterator[Document]:
    """Every document of the installed ``packages``, in a fixed order (package, then path)."""
    for package, files in require(packages, dpkg_info).items():
        if package == "manpages-ja":
            yield from _man_pages(package, files)
        else:
            yield from _html_pages(package, files, split_sections=package == "debian-reference-ja")
