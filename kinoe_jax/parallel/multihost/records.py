"""THE first error of a run: one record, published in the coordination service's key-value store
and written to DIR/logs/first_error.json, and how a process leaves once it is known."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time

from kinoe_jax.parallel.multihost.startup import Run, current

log = logging.getLogger("kinoe_jax.multihost")

FIRST_ERROR_KEY = "kinoe_jax/first_error"
ERROR_FILE = "first_error.json"


def client():
    from jax._src import distributed

    return distributed.global_state.client


def describe(record: dict) -> str:
    """The one terminal line of a record: a process that failed, or one that died."""
    if record.get("kind") == "lost":
        return record["error"]
    where = f" (full traceback in {record['log']})" if record.get("log") else ""
    return (f"process {record['process']} of {record['num_processes']} on {record['host']} failed first: "
            f"{record['error']}{where}")


def publish(record: dict, run: Run) -> dict:
    """Publish `record` as THE first error unless another process got there first; return the winner."""
    kv = client() if run.distributed else None
    winner = record
    if kv is not None:
        try:
            kv.key_value_set(FIRST_ERROR_KEY, json.dumps(record), allow_overwrite=False)
        except Exception:  # noqa: BLE001 - the key exists (someone failed earlier) or the service is gone
            try:
                winner = json.loads(kv.key_value_try_get(FIRST_ERROR_KEY))
            except Exception:  # noqa: BLE001
                winner = read_error_file(run.workdir) or record
    if winner is record and run.workdir:
        _write_error_file(run.workdir, record)
    return winner


def _write_error_file(workdir: str, record: dict) -> None:
    """A post-mortem record in the workdir; O_EXCL keeps the first writer's on a shared disk."""
    path = os.path.join(workdir, "logs", ERROR_FILE)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)
        f.write("\n")


def read_error_file(workdir: str | None) -> dict | None:
    if not workdir:
        return None
    try:
        with open(os.path.join(workdir, "logs", ERROR_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_first_error(workdir: str) -> dict | None:
    """The first error a multi-process run recorded in DIR/logs/first_error.json, if any."""
    return read_error_file(workdir)


def set_aside_old_record(run: Run) -> None:
    """A resumed run's first error is its own: an earlier run's record moves to first_error.<time>.json."""
    path = os.path.join(run.workdir or "", "logs", ERROR_FILE)
    if run.process_id == 0 and run.workdir and os.path.exists(path):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
        with contextlib.suppress(OSError):
            os.replace(path, path.replace(".json", f".{stamp}.json"))


def to_log_file(text: str, level: int = logging.ERROR) -> None:
    """A line (a traceback, say) for this process's log file only, never the terminal."""
    run = current()
    handler = run.file_handler if run else None
    if handler is None:
        log.log(level, "%s", text)
        return
    handler.handle(log.makeRecord(log.name, level, __file__, 0, "%s", (text,), None))


def flush_logs() -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()


def quiet_terminal() -> None:
    """From here on the terminal gets only the line this process leaves with."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.CRITICAL + 1)


def say(line: str) -> None:
    to_log_file(line)
    print(f"kinoe_jax: {line}", file=sys.stderr, flush=True)


_LEAVING = threading.RLock()


def leave_once() -> None:
    """Only one thread says why the process ends and ends it; any other that decides the same
    waits here for that exit (two lines, or a second alert, would tell a different story)."""
    if not _LEAVING.acquire(blocking=False):
        while True:
            time.sleep(3600)


def stop_now(message: str, linger_s: float = 0.0, status: int = 1) -> None:
    """Leave: the other processes are gone or failing, collectives would hang.

    `linger_s` keeps this process (and the coordination service, if it hosts it) alive that long
    after saying why, so that a failing peer can finish its own record before the service goes."""
    leave_once()
    quiet_terminal()
    say(message)
    flush_logs()
    if linger_s > 0:
        time.sleep(linger_s)
    os._exit(status)


def peer_log(run: Run, pid: int) -> str:
    return os.path.join(run.workdir, "logs", f"process_{pid}.log") if run.workdir else f"process {pid}'s output"
