"""Checkpoint integrity at restore: a crash mid-save or a damaged file must not end the run, and
must never make it start from scratch while checkpoints exist.

Orbax writes a step into `<step>.orbax-checkpoint-tmp...` and renames it when complete, so a
save interrupted by a crash never looks committed (those leftovers are reported and removed).
A committed step can still be damaged afterwards (a truncated or deleted file, a disk error):
that shows up only when reading it back. So the newest step is restored, and on failure the
next older one, until one reads back whole; the broken ones are then moved to
`<checkpoints>/../corrupt_checkpoints/` so that the run can save those step numbers again.
If no step can be restored, nothing is moved and the error lists every step's problem.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Callable

import jax
import numpy as np

log = logging.getLogger(__name__)

TMP_MARKER = ".orbax-checkpoint-tmp"
Notify = Callable[[str, str, str], None]  # (title, text, level)


class CheckpointUnusableError(RuntimeError):
    pass


def unfinished_saves(directory: str) -> list[str]:
    """Step directories a crash left half written (never committed)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if TMP_MARKER in n)


def discard_unfinished(directory: str) -> list[str]:
    """Remove what interrupted saves left behind (only the run that owns the directory may)."""
    found = unfinished_saves(directory)
    if found and jax.process_index() == 0:
        log.warning("checkpoints: discarding %d unfinished save(s) in %s (interrupted before their commit): %s",
                    len(found), directory, ", ".join(found))
        for name in found:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return found


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


def all_processes_ok(ok: bool) -> bool:
    """A file only one process reads (its data iterator) may fail on that process alone."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def restore_newest_good(manager, restore_step: Callable[[int], object], notify: Notify | None = None):
    """(restored, step) of the newest step that reads back whole; see the module docstring."""
    steps = sorted(manager.all_steps(), reverse=True)
    problems: list[tuple[int, str]] = []
    for step in steps:
        error = None
        try:
            restored = restore_step(step)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore/TF raise many kinds for damaged files
            restored, error = None, e
        if not all_processes_ok(error is None):
            problem = _short(error) if error is not None else "failed to restore on another process"
            problems.append((step, problem))
            log.error("checkpoint step %d cannot be restored (%s); trying an older one", step, problem)
            continue
        if problems:
            bad = [s for s, _ in problems]
            moved = _quarantine(manager, bad)
            text = (f"checkpoint step(s) {bad} in {manager.directory} could not be restored "
                    f"({'; '.join(f'{s}: {p}' for s, p in problems)}). Resumed from step {step} instead"
                    + (f"; the broken ones were moved to {moved}" if moved else "") + ".")
            log.error("%s", text)
            if notify is not None:
                notify("checkpoint damaged: fell back", text, "WARN")
        return restored, step
    if steps:
        detail = "; ".join(f"step {s}: {p}" for s, p in problems)
        raise CheckpointUnusableError(
            f"checkpoints exist in {manager.directory} (steps {steps}) but none could be restored: {detail}. "
            "Refusing to start from scratch over them: if the configuration changed, restore it; to really "
            "start over, move that directory away.")
    return None, None


def _quarantine(manager, steps: list[int]) -> str | None:
    """Move damaged steps out of Orbax's sight, so the run can write those step numbers again."""
    from etils import epath

    directory = epath.Path(manager.directory)
    dest = directory.parent / "corrupt_checkpoints"
    if jax.process_index() == 0:
        dest.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            src = directory / str(step)
            if src.exists():
                src.rename(dest / f"{step}-{stamp}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kinoe_quarantine_checkpoints")
    manager.reload()
    return os.fspath(dest)
