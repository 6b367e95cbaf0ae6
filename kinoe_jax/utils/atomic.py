"""Outputs that appear whole or not at all: a file or a directory is written beside its final
name and renamed over it, so a crash leaves the old result (or nothing), never half of a new one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Iterator

from kinoe_jax.utils.errors import InputError


class OutputExists(InputError):
    """The output the user named is already there and --overwrite was not given."""


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a scratch file beside `path`; it replaces `path` only if the block succeeds."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str, obj, **dump_kwargs) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, **dump_kwargs)


def copy_file(src: str, dst: str) -> None:
    with atomic_file(dst, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out)


def check_output(final: str, overwrite: bool) -> str:
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite:
        raise OutputExists(f"{final} already exists; pass --overwrite to replace it")
    if os.path.exists(final) and not os.path.isdir(final):
        raise OutputExists(f"{final} exists and is not a directory")
    return final


@contextlib.contextmanager
def atomic_directory(final: str, overwrite: bool):
    """Yields a scratch directory beside `final`; renamed to `final` only if the block succeeds.

    On any error the scratch directory (and any parent directories created for it) is removed,
    so a failed conversion leaves nothing behind.
    """
    final = check_output(final, overwrite)
    parent = os.path.dirname(final)
    created = []
    probe = parent
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(final)
    tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(final, os.path.join(old, name))
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
