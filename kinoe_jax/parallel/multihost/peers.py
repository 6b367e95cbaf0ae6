"""Watching the other processes: their first error, and whether they are still alive.

Two daemon threads per process:

* the error watcher blocks on the first-error key, so that when any process publishes an error
  (or a verdict that a process died) every other one stops within a second or two;
* the heartbeat thread writes this process's counter to the key-value store every few seconds.
  In process 0, which hosts the store, it also reads everyone's: a process whose counter has not
  moved for `peer_silence_s` (out-of-memory kill, `kill -9`, a lost host) is declared dead, and
  the verdict is published as the run's first error. A process that cannot reach process 0 for
  as long concludes that process 0 died.

The verdict comes before JAX's own (after `heartbeat_timeout_s`, which aborts every process with
a C++ stack trace), so the survivors leave calmly: one line naming the dead process and the newest
committed checkpoint, the record in DIR/logs/first_error.json and the alert, status EXIT_PEER_LOST.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

from kinoe_jax.parallel.multihost import records
from kinoe_jax.parallel.multihost.startup import Run

log = logging.getLogger("kinoe_jax.multihost")

EXIT_PEER_LOST = 76  # distinct from a Python error (1) and a hung run (75): restart on what is left
ALIVE = "kinoe_jax/alive/"
DONE = "kinoe_jax/done/"
HOST = "kinoe_jax/host/"

# What the training loop adds to a verdict (the newest checkpoint, the last step) and how it
# alerts; set by `on_peer_lost`, called from the thread that reaches the verdict.
_FACTS: list[Callable[[], dict]] = []
_ALERTS: list[Callable[[dict], None]] = []
_VERDICT = threading.Event()


def on_peer_lost(facts: Callable[[], dict] | None = None, alert: Callable[[dict], None] | None = None) -> None:
    _FACTS[:] = [facts] if facts else []
    _ALERTS[:] = [alert] if alert else []


def start(run: Run) -> None:
    kv = records.client()
    with contextlib.suppress(Exception):  # the host name is a courtesy in the verdict
        kv.key_value_set(f"{HOST}{run.process_id}", socket.gethostname(), allow_overwrite=True)
    for target, name in ((_watch_for_errors, "kinoe-error-watch"), (_heartbeats, "kinoe-heartbeat")):
        t = threading.Thread(target=target, args=(run,), name=name, daemon=True)
        t.start()
        run.threads.append(t)


def finished(run: Run) -> None:
    """A clean end: the others must not take this process's silence for a death."""
    with contextlib.suppress(Exception):  # the service may already be going down
        records.client().key_value_set(f"{DONE}{run.process_id}", "1", allow_overwrite=True)


def await_verdict(run: Run, timeout_s: float) -> bool:
    """Whether a verdict (a peer's error or death) came within `timeout_s`. When one did, the
    thread holding it ends the process (after lingering, in process 0): wait for that."""
    if not _VERDICT.wait(timeout_s):
        return False
    time.sleep(run.cfg.error_grace_s + 30.0)
    return True


# ----------------------------------------------------------------------------- the error watcher
def _watch_for_errors(run: Run) -> None:
    """Block on the first-error key; when another process publishes one, stop this process."""
    kv = records.client()
    unreachable_since = None
    while not run.stopping.is_set():
        try:
            value = kv.blocking_key_value_get(records.FIRST_ERROR_KEY, 1000)
        except Exception as e:  # noqa: BLE001
            text = str(e)
            if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
                unreachable_since = None
                continue
            if run.stopping.is_set():
                return
            # The coordination service (process 0) does not answer: the heartbeat thread decides.
            unreachable_since = unreachable_since or time.monotonic()
            time.sleep(0.5)
            continue
        if run.stopping.is_set():
            return
        _leave(run, json.loads(value))
        return


def _leave(run: Run, record: dict) -> None:
    lost = record.get("kind") == "lost"
    if not lost and record.get("process") == run.process_id:
        return  # our own error: the failing thread handles the exit
    _VERDICT.set()
    if lost:
        if run.process_id in record.get("lost", ()):
            message = f"{record['error']}; but process {run.process_id} is alive (it was silent): stopping it too"
        else:
            message = f"{record['error']}; stopping process {run.process_id}"
        _stop_lost(run, message, record)
    # Process 0 hosts the coordination service: leaving at once would make JAX abort the
    # failing process before it has written DIR/logs/first_error.json.
    records.stop_now(records.describe(record) + f"; stopping process {run.process_id}",
                     linger_s=run.cfg.error_grace_s if run.process_id == 0 else 0.0)


# ----------------------------------------------------------------------------- heartbeats
def _heartbeats(run: Run) -> None:
    kv = records.client()
    silence = run.cfg.silence_s()
    interval = max(0.2, min(2.0, silence / 10))
    began = time.monotonic()
    seen: dict[int, tuple[str, float]] = {}  # process -> (its counter, when it last moved)
    unreachable_since = None
    beat = 0
    while not run.stopping.wait(interval):
        beat += 1
        try:
            kv.key_value_set(f"{ALIVE}{run.process_id}", str(beat), allow_overwrite=True)
            unreachable_since = None
            if run.process_id == 0:
                now = time.monotonic()
                counters = _dir(kv, ALIVE)
                done = _dir(kv, DONE)
                for p in range(1, run.num_processes):
                    value = counters.get(p)
                    if p not in seen or seen[p][0] != value:
                        seen[p] = (value, now if p in seen or value is not None else began)
                silent = [p for p in range(1, run.num_processes)
                          if p not in done and now - seen[p][1] > silence]
                if silent:
                    _declare_lost(run, silent, now - min(seen[p][1] for p in silent), kv,
                                  deadline=min(seen[p][1] for p in silent) + run.cfg.heartbeat_timeout_s)
                    return
        except Exception as e:  # noqa: BLE001 - the coordination service is unreachable
            if run.stopping.is_set() or run.process_id == 0:
                continue
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since >= silence:
                _coordinator_lost(run, time.monotonic() - unreachable_since, e)
                return


def _dir(kv, prefix: str) -> dict[int, str]:
    out = {}
    for key, value in kv.key_value_dir_get(prefix):
        tail = key.rsplit("/", 1)[-1]
        if tail.isdigit():
            out[int(tail)] = value
    return out


def _hosts(kv, pids) -> str:
    names = []
    for p in pids:
        try:
            names.append(kv.key_value_try_get(f"{HOST}{p}"))
        except Exception:  # noqa: BLE001
            names.append("?")
    return ", ".join(names)


def _verdict(run: Run, dead: list[int], why: str, host: str = "?") -> dict:
    facts = {}
    for fn in _FACTS:
        try:
            facts.update(fn())
        except Exception as e:  # noqa: BLE001 - the verdict must go out whatever a hook does
            log.error("lost-process facts failed: %s", e)
    who = f"process {dead[0]}" if len(dead) == 1 else "processes " + ", ".join(map(str, dead))
    where = f" on {host}" if host != "?" else ""
    checkpoint = facts.get("checkpoint", "unknown")
    text = (f"{who} of {run.num_processes}{where} died: {why}; newest committed checkpoint: {checkpoint}; "
            f"exit status {EXIT_PEER_LOST}: run the same command to resume")
    return {"kind": "lost", "process": dead[0], "lost": dead, "num_processes": run.num_processes, "host": host,
            "error": text, "detected_by": run.process_id, "time": time.time(), "log": records.peer_log(run, dead[0]),
            **facts}


def _declare_lost(run: Run, dead: list[int], silent_s: float, kv, deadline: float) -> None:
    """Process 0: publish the verdict, alert, and leave before JAX's own verdict aborts everyone."""
    record = _verdict(run, dead, f"no heartbeat for {silent_s:.0f} s", _hosts(kv, dead))
    _VERDICT.set()
    winner = records.publish(record, run)
    if winner.get("kind") != "lost" and winner.get("process") != run.process_id:
        _leave(run, winner)  # someone's Python error came first: that is the story
    # Linger (the others read the verdict from this process's store), but leave before JAX's
    # heartbeat verdict, which aborts.
    linger = max(0.0, min(run.cfg.error_grace_s, deadline - time.monotonic() - 2.0))
    _stop_lost(run, f"{record['error']}; stopping process 0", record, linger)


def _coordinator_lost(run: Run, silent_s: float, e: BaseException) -> None:
    """Process 0 does not answer: it died (its own record, if it wrote one first, says otherwise)."""
    first = records.read_error_file(run.workdir)  # set aside at the start: it is this run's
    if first:
        _leave(run, first)
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    record = _verdict(run, [0], f"its coordination service has not answered for {silent_s:.0f} s ({detail})")
    _VERDICT.set()
    if run.workdir:
        records.publish(record, run)  # the store is gone: this writes DIR/logs/first_error.json
    _stop_lost(run, f"{record['error']}; stopping process {run.process_id}", record)


def _stop_lost(run: Run, message: str, record: dict, linger_s: float = 0.0) -> None:
    records.leave_once()
    records.quiet_terminal()  # alerts and library complaints go to the log file only
    if run.process_id == 0 or (0 in record.get("lost", ()) and run.process_id == 1):
        for alert in _ALERTS:  # one process alerts: process 0, or process 1 if 0 died
            try:
                alert(record)
            except Exception as e:  # noqa: BLE001
                log.error("lost-process alert failed: %s", e)
    records.stop_now(message, linger_s=linger_s, status=EXIT_PEER_LOST)
