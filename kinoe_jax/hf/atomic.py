"""An output directory that appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from kinoe_jax.hf.mapping import ConversionError


def check_output(final: str, overwrite: bool) -> str:
    final = os.path.abspath(final)
    if os.path.exists(final) and not overwrite:
        raise ConversionError(f"{final} already exists; pass --overwrite to replace it")
    if os.path.exists(final) and not os.path.isdir(final):
        raise ConversionError(f"{final} exists and is not a directory")
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
