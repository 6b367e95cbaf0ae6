"""What every command-line tool does with a bad input path: one line on stderr, exit status 2.

    train.py: error: --gin_file=configs/run.gin: no such file

The checks (a file, a directory, a glob or a directory of files, UTF-8 text, not empty) raise
InputError; `reported(parser)` turns it into that one line. Only input problems are caught:
anything else is a bug and keeps its traceback. This module imports nothing heavy, so a tool can
run `precheck` before it loads TensorFlow or JAX and answer a typo in a moment.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import glob
import gzip
import os
import sys
import zlib

from kinoe_jax.config.paths import REPO_ROOT
from kinoe_jax.utils.errors import InputError


# A corpus can be far too large to decode before starting; its first chunk tells a file in another
# encoding (Shift_JIS, EUC-JP) from a UTF-8 file with a few bad lines, which the readers count.
SNIFF_BYTES = 1 << 16
JSONL = (".jsonl", ".jsonl.gz")  # what a directory given for JSONL input contributes


class InputExit(SystemExit):
    """Exit status 2 once the message is on stderr; str() is the message, for callers of main()."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(prog, message: str):
    """Print `prog: error: message` as one line and exit with status 2 (argparse's usage-error status)."""
    prog = getattr(prog, "prog", prog)
    message = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise InputExit(message)


@contextlib.contextmanager
def reported(prog, *also: type[BaseException]):
    """InputError, and the listed exception types (a library's own input errors), become `fail`."""
    try:
        yield
    except (InputError, *also) as e:
        fail(prog, str(e))


def _label(flag: str | None, arg: str) -> str:
    return f"{flag}={arg}" if flag else arg


# ----------------------------------------------------------------------------- the checks
def _where(flag: str | None, arg: str, path: str) -> str:
    """`--flag=ARG: ` plus the file itself when ARG was a glob or a directory it came from."""
    return f"{_label(flag, arg)}: " + ("" if path == arg else f"{path} ")


def data_file(flag: str | None, path: str, *, arg: str | None = None) -> str:
    """An existing, non-empty file of any content (a SentencePiece model, say)."""
    where = _where(flag, arg or path, path)
    if not os.path.exists(path):
        raise InputError(f"{where}no such file")
    if os.path.isdir(path):
        raise InputError(f"{where}is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{where}is empty")
    return path


def text_file(flag: str | None, path: str, *, sniff: bool = False, arg: str | None = None) -> str:
    """An existing, non-empty file of UTF-8 text, decoded whole. With `sniff` (for inputs too large
    to read twice), only its start is checked, for text in another encoding: a stray bad line and a
    corrupt gzip stream are left to the reader, which counts or reports them where it meets them.
    `arg` is what the user typed, when the file came from a glob or a directory."""
    data_file(flag, path, arg=arg)
    where = _where(flag, arg or path, path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise InputError(f"{where}cannot be read ({e.strerror or e})") from None
    with raw, (gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw) as f:
        try:
            head = f.read(SNIFF_BYTES) if sniff else b""
            size = len(head) if sniff else _check_whole(f, where)
        except (OSError, EOFError, zlib.error) as e:
            if sniff:
                return path
            raise InputError(f"{where}cannot be read ({e})") from None
    if not size:
        raise InputError(f"{where}holds no data (an empty gzip stream)")
    if sniff:
        _check_start(head, where, cut=size == SNIFF_BYTES)
    return path


def _check_whole(f, where: str) -> int:
    """Decode all of `f`; returns its size."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, size = 1, 0
    while chunk := f.read(1 << 20):
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as e:
            raise InputError(_not_utf8(where, e, line)) from None
        line += chunk.count(b"\n")
        size += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputError(f"{where}is not UTF-8 text (it ends inside a character)") from None
    return size


def _check_start(head: bytes, where: str, cut: bool) -> None:
    """Refuse a file none of whose first lines is UTF-8; a stray bad line is the reader's to count."""
    lines = head.split(b"\n")
    if cut and len(lines) > 1:
        lines, cut = lines[:-1], False  # drop the line the chunk cut
    first_error = None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
            return
        except UnicodeDecodeError as e:
            first_error = first_error or (e, number)
    if first_error:
        raise InputError(_not_utf8(where, *first_error))


def _not_utf8(where: str, e: UnicodeDecodeError, line: int) -> str:
    line += e.object.count(b"\n", 0, e.start)
    return (f"{where}is not UTF-8 text (line {line}: byte 0x{e.object[e.start]:02x}); re-encode it "
            f"(from Shift_JIS: iconv -f SHIFT_JIS -t UTF-8)")


def directory(flag: str | None, path: str) -> str:
    """An existing directory with something in it."""
    where = _where(flag, path, path)
    if not os.path.exists(path):
        raise InputError(f"{where}no such directory")
    if not os.path.isdir(path):
        raise InputError(f"{where}is a file, not a directory")
    if not os.listdir(path):
        raise InputError(f"{where}the directory is empty")
    return path


def text_files(flag: str | None, pattern: str, suffixes: tuple[str, ...], *, sniff: bool = False) -> list[str]:
    """The files a glob (`**` allowed), a directory (its files ending in `suffixes`) or a path names;
    each one a non-empty UTF-8 file."""
    where = _where(flag, pattern, pattern)
    if os.path.isdir(pattern):
        files = sorted(os.path.join(pattern, n) for n in os.listdir(pattern)
                       if n.endswith(suffixes) and os.path.isfile(os.path.join(pattern, n)))
        if not files:
            below = sorted(n + "/" for n in os.listdir(pattern) if os.path.isdir(os.path.join(pattern, n))
                           and any(f.endswith(suffixes) for f in os.listdir(os.path.join(pattern, n))))
            raise InputError(f"{where}a directory holding no {' or '.join('*' + s for s in suffixes)} files"
                             + (f" (these subdirectories do: {', '.join(below)})" if below else ""))
    elif glob.has_magic(pattern):
        files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise InputError(f"{where}no file matches")
    else:
        files = [pattern]
    for path in files:
        text_file(flag, path, sniff=sniff, arg=pattern)
    return files


def gin_file(flag: str | None, path: str) -> str:
    """A gin file, found as gin will find it: from the working directory or the repository root."""
    found = path if os.path.exists(path) or not os.path.exists(os.path.join(REPO_ROOT, path)) else \
        os.path.join(REPO_ROOT, path)
    text_file(flag, found, arg=path)
    return path


def text_arg(flag: str | None, value: str) -> str:
    """Command-line text: bytes that were not UTF-8 arrive as lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{flag}: is not UTF-8 text (byte 0x{ord(value[e.start]) & 0xFF:02x} at character "
                         f"{e.start + 1})") from None
    return value


# ----------------------------------------------------------------------------- before heavy imports
class _Lenient(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def precheck(checks: dict, argv: list[str] | None = None) -> None:
    """Run `checks` ({flag: check(flag, value)}) on the raw command line; the tool's own parser
    still parses it (and checks again) later. Called before a tool imports TensorFlow or JAX."""
    parser = _Lenient(prog=os.path.basename(sys.argv[0]), add_help=False, allow_abbrev=False)
    for flag in checks:
        parser.add_argument(flag, action="append", default=[])
    try:
        known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    except ValueError:  # a malformed command line is the tool's own parser's to explain
        return
    with reported(parser):
        for flag, check in checks.items():
            for value in getattr(known, flag.lstrip("-")):
                if value:  # '' means "none" to some flags (--compare='')
                    check(flag, value)


def check_args(parser, args, checks: dict) -> None:
    """The same `checks` on parsed arguments (defaults included); a flag left unset is skipped."""
    with reported(parser):
        for flag, check in checks.items():
            value = getattr(args, flag.lstrip("-"))
            for v in value if isinstance(value, list) else [value]:
                if v:
                    check(flag, v)
