"""A failed Orbax restore must not leave reads behind.

Orbax runs each restore on a fresh event loop (`asyncio_utils._run_sync_via_new_loop`) and closes
that loop as soon as the restore raises. When one array of a damaged checkpoint cannot be read,
the reads of every other array are still in flight: their tasks are destroyed unfinished, and
TensorStore's completions later call into the closed loop. Python reports each as an unraisable
exception, long after the fallback to an older checkpoint has succeeded.

`settled_reads()` lets those reads finish (successfully or not) before the loop closes, so a
failed restore ends whole. It wraps Orbax's private runner only while a restore runs, and does
nothing where that runner does not exist (other Orbax versions).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from orbax.checkpoint._src import asyncio_utils

_RUNNER = "_run_sync_via_new_loop"
_lock = threading.Lock()


def _run_and_settle(coro):
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except BaseException:
            # The restore failed; wait for its other reads, whose own errors are expected now.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@contextlib.contextmanager
def settled_reads():
    original = getattr(asyncio_utils, _RUNNER, None)
    if original is None:
        yield
        return
    with _lock:
        setattr(asyncio_utils, _RUNNER, _run_and_settle)
        try:
            yield
        finally:
            setattr(asyncio_utils, _RUNNER, original)
