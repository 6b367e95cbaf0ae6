"""Notice a run that stopped making progress: a hung collective, a stuck input pipeline.

`beat()` is called whenever a step is seen to complete. When no beat comes for `timeout_s`, a
thread calls `on_hang` (which alerts, dumps every thread's stack and exits non-zero so the
scheduler restarts the job). The clock starts at the first beat, so a long first compilation
does not count. As a backstop for a main thread that never lets Python run (stuck in C while
holding the GIL), faulthandler's own timer dumps the stacks and exits a little later.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

EXIT_HUNG = 75  # EX_TEMPFAIL: "try again", which is what a scheduler should do


class Watchdog:
    def __init__(self, timeout_s: float, on_hang: Callable[[float], None], backstop_s: float | None = 120.0,
                 clock: Callable[[], float] = time.monotonic):
        self.timeout_s = float(timeout_s)
        self.on_hang = on_hang
        self.backstop_s = backstop_s
        self.clock = clock
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backstop_armed = False

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kinoe-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        if not self.enabled:
            return
        self._last = self.clock()
        if self.backstop_s is not None:
            try:
                faulthandler.dump_traceback_later(self.timeout_s + self.backstop_s, exit=True, file=sys.stderr)
                self._backstop_armed = True
            except (ValueError, OSError, AttributeError):  # stderr without a file descriptor
                self.backstop_s = None

    def stop(self) -> None:
        self._stop.set()
        if self._backstop_armed:
            faulthandler.cancel_dump_traceback_later()
            self._backstop_armed = False
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def _run(self) -> None:
        poll = min(max(self.timeout_s / 10, 0.05), 5.0)
        while not self._stop.wait(poll):
            last = self._last
            if last is None:
                continue
            idle = self.clock() - last
            if idle > self.timeout_s:
                self.on_hang(idle)
                return


def dump_stacks(path: str | None = None) -> str | None:
    """Every thread's Python stack to stderr and, when given, to `path`."""
    print(f"\n==== kinoe_jax watchdog: stacks of all threads (pid {os.getpid()}) ====", file=sys.stderr, flush=True)
    try:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    except (ValueError, OSError, AttributeError):
        pass
    if path is None:
        return None
    try:
        with open(path, "w", encoding="utf-8") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
    except OSError as e:
        log.error("could not write stacks to %s: %s", path, e)
        return None
    return path


def end_child_processes(timeout_s: float = 5.0) -> None:
    """Terminate the processes this one started (W&B's service among them), then kill leftovers."""
    try:
        import psutil
    except ImportError:
        return
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
