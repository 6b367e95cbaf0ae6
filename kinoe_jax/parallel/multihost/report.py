"""Turning an exception into the run's first error, and telling a collective that failed because a
peer died from a real failure of this process."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback

from kinoe_jax.parallel.multihost import peers, records
from kinoe_jax.parallel.multihost.startup import Run, current
from kinoe_jax.utils.errors import ConfigError

# Runtime errors that a process sees when a *peer* died (its sockets closed, the service gone).
_PEER_FAILURE_HINTS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused",
                       "socket closed", "unavailable", "deadline_exceeded", "coordination service",
                       "heartbeat", "barrier")


def maybe_secondary(e: BaseException) -> bool:
    if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return False
    text = str(e).lower()
    return "resource_exhausted" not in text and any(h in text for h in _PEER_FAILURE_HINTS)


def _first_line(e: BaseException, limit: int = 200) -> str:
    return (str(e).strip().splitlines() or [""])[0][:limit]


def await_root_cause(run: Run, e: BaseException) -> None:
    """A collective failed here, most likely because another process died. Give the real cause
    time to surface: a peer's published error or the verdict that a process died (the thread that
    gets it ends this process with its own line). Only if neither comes is this error reported
    as the first. Everything said here goes to the log file: the terminal gets one line."""
    wait = run.cfg.silence_s() + 5.0
    records.to_log_file(f"process {run.process_id}: a collective failed ({type(e).__name__}: {_first_line(e)}); "
                        f"another process probably died - waiting up to {wait:.0f} s for it to be named:\n"
                        + traceback.format_exc())
    records.flush_logs()
    peers.await_verdict(run, wait)


@contextlib.contextmanager
def collective_failures():
    """Inside the training loop: a collective that failed because a peer died waits for the verdict
    here, before anything (the crash alert, say) reports it as this process's own failure."""
    try:
        yield
    except Exception as e:
        run = current()
        if run is not None and run.multi and maybe_secondary(e):
            await_root_cause(run, e)
        raise


@contextlib.contextmanager
def report_errors():
    """Wrap the run: an exception here becomes the run's first error, seen by every process.

    A ConfigError (a setting that cannot work) is one line and status 2. Other errors of a
    single-process run keep Python's traceback on the terminal. In a multi-process run the
    traceback goes to this process's log, the terminal gets one line, and this process exits
    with status 1 (without the shutdown barrier, which would wait for processes stuck in a
    collective), after every other process has been told.
    """
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        run = current()
        if run is None:
            raise
        tb = traceback.format_exc()
        records.to_log_file(f"process {run.process_id} failed:\n{tb}")
        if not run.multi:
            if isinstance(e, ConfigError):
                # The first line: gin appends where it was called from, which the log keeps.
                print(f"error: {_first_line(e, 2000)}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            raise
        if maybe_secondary(e):
            await_root_cause(run, e)
        records.leave_once()
        run.stopping.set()
        record = {"process": run.process_id, "num_processes": run.num_processes, "host": socket.gethostname(),
                  "error": f"{type(e).__name__}: {_first_line(e, 300)}", "time": time.time(), "log": run.log_path}
        winner = records.publish(record, run)
        records.quiet_terminal()
        if winner.get("process") == run.process_id:
            records.say(records.describe(winner))
            if run.process_id == 0:
                # Process 0 hosts the key-value store: keep it up while the others read the error.
                time.sleep(run.cfg.error_grace_s)
        else:
            records.say(f"{records.describe(winner)}; process {run.process_id} then failed with {record['error']}")
        records.flush_logs()
        os._exit(2 if isinstance(e, ConfigError) else 1)
