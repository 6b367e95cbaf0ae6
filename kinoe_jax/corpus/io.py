"""Streaming input and atomic sharded output.

Input is read line by line as bytes, so decoding and JSON errors surface per
line and can be counted instead of aborting a multi-hour run. Output is
written into a hidden directory beside the target and renamed into place at
the end, so a crashed or interrupted run never leaves a half-written corpus
where a training job could pick it up.
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

_LINE_BITS = 40  # room for 10^12 lines per file, 2^23 files


class InputNotFoundError(FileNotFoundError):
    pass


class OutputExistsError(FileExistsError):
    pass


def make_doc_id(file_index: int, line_no: int) -> int:
    """One integer that sorts in input order and names file and line."""
    return (file_index << _LINE_BITS) | line_no


def split_doc_id(doc_id: int) -> tuple[int, int]:
    return doc_id >> _LINE_BITS, doc_id & ((1 << _LINE_BITS) - 1)


def is_remote(path: str) -> bool:
    return "://" in path


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Files matching each pattern, sorted so ids and output are stable.

    Every pattern must match at least one file: a typo in one of several
    patterns would otherwise silently shrink the corpus.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if is_remote(pattern):
            from apache_beam.io.filesystems import FileSystems

            try:
                matches = sorted(m.path for r in FileSystems.match([pattern]) for m in r.metadata_list)
            except Exception as e:  # Beam raises different types per filesystem
                raise InputNotFoundError(f"cannot list {pattern!r}: {e}") from e
        else:
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputNotFoundError(f"no input files match {pattern!r}")
        for match in matches:
            if match not in seen:  # overlapping patterns must not double the data
                seen.add(match)
                files.append(match)
    return files


def _open_raw(path: str) -> BinaryIO:
    if is_remote(path):
        from apache_beam.io.filesystems import CompressionTypes, FileSystems

        # Decompression is done below, the same way for every filesystem.
        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return open(path, "rb")


class LineReader:
    """Yields (line number, raw bytes) of non-blank lines of one file.

    ``consumed`` is the number of bytes taken from a local disk so far
    (compressed bytes for .gz), which drives the progress bar. A file that
    is cut short or corrupt ends the iteration and leaves the problem in
    ``error``.
    """

    def __init__(self, path: str):
        self.path = path
        self.consumed = 0
        self.error: Optional[tuple[int, str]] = None

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        line_no = 0
        track = not is_remote(self.path)
        try:
            with _open_raw(self.path) as raw:
                stream = gzip.GzipFile(fileobj=raw, mode="rb") if self.path.endswith(".gz") else raw
                for line_no, line in enumerate(stream, 1):
                    if track:
                        self.consumed = raw.tell()
                    if line.strip():
                        yield line_no, line
        except (OSError, EOFError, zlib.error) as e:
            self.error = (line_no + 1, f"{type(e).__name__}: {e}")


class StagedDirectory:
    """A hidden temporary directory that replaces ``target`` on publish."""

    def __init__(self, target: str, overwrite: bool):
        self.target = Path(target)
        self.overwrite = overwrite
        self.path: Optional[Path] = None

    def _check_target(self) -> None:
        if self.target.exists():
            if not self.target.is_dir():
                raise OutputExistsError(f"output {self.target} exists and is not a directory")
            if any(self.target.iterdir()) and not self.overwrite:
                raise OutputExistsError(
                    f"output directory {self.target} is not empty; pass --overwrite to replace it")

    def __enter__(self) -> "StagedDirectory":
        self._check_target()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # Beside the target, so the final rename stays on one filesystem.
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        # mkdtemp makes the directory private; the published output should
        # get the permissions of a normally created directory.
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)
        return self

    def publish(self) -> None:
        assert self.path is not None
        self._check_target()  # it may have appeared while we were running
        old = None
        if self.target.exists() and any(self.target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, old / "data")
        os.replace(self.path, self.target)
        self.path = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.jsonl.gz"


def open_gzip_writer(path: str, compresslevel: int) -> gzip.GzipFile:
    """Gzip stream to a local or remote file; close its ``fileobj`` too.

    mtime=0 and no embedded file name make equal content byte-identical.
    """
    if is_remote(path):
        from apache_beam.io.filesystems import CompressionTypes, FileSystems

        raw = FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)
    else:
        raw = open(path, "wb")
    return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0)


def close_gzip_writer(stream: gzip.GzipFile) -> None:
    fileobj = stream.fileobj
    stream.close()  # GzipFile does not close a fileobj it was given
    fileobj.close()


class ShardWriter:
    """Writes JSONL lines into numbered gzip shards of ``shard_size`` lines.

    Shards are named ``shard-XXXXX-of-NNNNN.jsonl.gz``; the total is only
    known at the end, so they are renamed in ``close``. An empty result still
    gets one (empty) shard so that readers globbing the directory find data
    files.
    """

    def __init__(self, directory: Path, shard_size: int, compresslevel: int):
        self.directory = directory
        self.shard_size = shard_size
        self.compresslevel = compresslevel
        self._shards: list[Path] = []
        self._file: Optional[gzip.GzipFile] = None
        self._in_shard = 0

    def _next_shard(self) -> None:
        self._close_file()
        path = self.directory / f"partial-{len(self._shards):05d}.jsonl.gz"
        self._shards.append(path)
        self._file = open_gzip_writer(str(path), self.compresslevel)
        self._in_shard = 0

    def _close_file(self) -> None:
        if self._file is not None:
            close_gzip_writer(self._file)
            self._file = None

    def write(self, line: bytes) -> None:
        if self._file is None or self._in_shard >= self.shard_size:
            self._next_shard()
        self._file.write(line)
        self._in_shard += 1

    def close(self) -> list[str]:
        if not self._shards:
            self._next_shard()
        self._close_file()
        names = []
        for i, path in enumerate(self._shards):
            name = shard_name(i, len(self._shards))
            path.rename(self.directory / name)
            names.append(name)
        return names
