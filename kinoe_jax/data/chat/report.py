"""Reading chat JSONL files line by line, with every skipped line counted and named by file:line."""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
from typing import Callable, Iterable, Iterator

from tqdm import tqdm

from kinoe_jax.data.chat.conversation import REASONS, BadExample


@dataclasses.dataclass(frozen=True)
class Problem:
    path: str
    line: int
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}: {self.detail or REASONS.get(self.reason, '')}"


@dataclasses.dataclass
class Report:
    """What a pass over some files kept and what it skipped."""

    files: list[str] = dataclasses.field(default_factory=list)
    total: int = 0
    kept: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(p.reason for p in self.problems))

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def add(self, path: str, line: int, err: BadExample) -> None:
        self.problems.append(Problem(path, line, err.reason, err.detail))

    def summary(self, limit_per_reason: int | None = 20) -> str:
        head = f"{self.kept} of {self.total} examples kept from {len(self.files)} file(s)"
        if not self.problems:
            return head
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        lines = [f"{head}; {self.skipped} skipped ({counts})"]
        shown: collections.Counter = collections.Counter()
        for p in self.problems:
            shown[p.reason] += 1
            if limit_per_reason is None or shown[p.reason] <= limit_per_reason:
                lines.append(f"  {p}")
        for reason, n in sorted(shown.items()):
            if limit_per_reason is not None and n > limit_per_reason:
                lines.append(f"  ... and {n - limit_per_reason} more {reason}")
        return "\n".join(lines)


def expand(patterns: str | Iterable[str]) -> list[str]:
    """Sorted files of one or more glob patterns; a pattern matching nothing is an error."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[str] = []
    for p in patterns:
        found = sorted(glob.glob(p))
        if not found:
            raise FileNotFoundError(f"no file matches {p!r}")
        files += [f for f in found if f not in files]
    return files


def read_lines(path: str) -> Iterator[tuple[int, str | BadExample]]:
    """(1-based line number, text) of every non-blank line; .gz files are decompressed.

    A line that is not UTF-8 comes back as a BadExample instead of stopping the file.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield i, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, BadExample("malformed_json", f"not UTF-8 ({e.reason} at byte {e.start})")


def scan(patterns, handle: Callable[[str], object], report: Report | None = None,
         progress: bool = False) -> tuple[list[tuple[str, int, object]], Report]:
    """Run `handle(line)` on every line; BadExample goes into the report, results are returned."""
    report = report or Report()
    out: list[tuple[str, int, object]] = []
    files = expand(patterns)
    if progress:
        files = tqdm(files, desc="checking data", unit="file", leave=False)
    for path in files:
        report.files.append(path)
        for line_no, text in read_lines(path):
            report.total += 1
            try:
                if isinstance(text, BadExample):
                    raise text
                out.append((path, line_no, handle(text)))
                report.kept += 1
            except BadExample as e:
                report.add(path, line_no, e)
    return out, report
