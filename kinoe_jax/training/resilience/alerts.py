"""Alerts that reach people: W&B's alert API (which a team routes to Slack or e-mail), optionally a
webhook, always the log and DIR/alerts.jsonl.

* Off when W&B is off: the W&B sink exists only while a W&B run is attached.
* Rate-limited per kind of alert; suppressed ones are counted and mentioned in the next one.
* Secrets never come from configs: the webhook URL is read from an environment variable.
* Delivery runs on a background thread, so a slow network never stalls a training step.
* Tests (or other integrations) inject sinks: callables `sink(title, text, level)`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.request
from typing import Callable, Sequence

import gin

log = logging.getLogger(__name__)

LEVELS = ("INFO", "WARN", "ERROR")
Sink = Callable[[str, str, str], None]


def wandb_sink(run, wait_duration_s: float) -> Sink:
    def send(title: str, text: str, level: str) -> None:
        # W&B limits titles to 64 characters and keeps its own per-title rate limit.
        run.alert(title=title[:63], text=text, level=level, wait_duration=max(wait_duration_s, 1.0))

    return send


def webhook_sink(url: str, timeout_s: float = 10.0) -> Sink:
    """POST {"text": ...} (Slack's incoming-webhook format, which many chat tools accept)."""

    def send(title: str, text: str, level: str) -> None:
        body = json.dumps({"text": f"[{level}] {title}\n{text}"}).encode("utf-8")
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()

    return send


@gin.configurable
class Alerter:
    def __init__(self, run_name: str = "", log_file: str | None = None, active: bool = True,
                 min_interval_s: float = 600.0, sinks: Sequence[Sink] = (),
                 webhook_env: str = "KINOE_ALERT_WEBHOOK", clock: Callable[[], float] = time.monotonic):
        self.run_name = run_name
        self.log_file = log_file if active else None
        self.active = active
        self.min_interval_s = float(min_interval_s)
        self.clock = clock
        self._sinks: list[tuple[str, Sink]] = [(getattr(s, "__name__", "sink"), s) for s in sinks]
        url = os.environ.get(webhook_env) if webhook_env else None
        if url and active:
            self._sinks.append(("webhook", webhook_sink(url)))
        self._last_sent: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._delivered: list[tuple[str, str, str]] = []  # replayed to a W&B run attached later
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def attach_wandb(self, run) -> None:
        """Send (and replay) alerts to this W&B run; None or a disabled run leaves W&B off."""
        if run is None or not self.active or getattr(getattr(run, "settings", None), "mode", "") == "disabled":
            return
        sink = wandb_sink(run, self.min_interval_s)
        with self._lock:
            self._sinks.append(("wandb", sink))
            backlog = list(self._delivered)
        for title, text, level in backlog:
            self._enqueue([("wandb", sink)], title, text, level)

    def send(self, kind: str, title: str, text: str, level: str = "WARN", step: int | None = None) -> bool:
        """Log, record and (unless rate-limited) deliver. Returns whether it was delivered."""
        if level not in LEVELS:
            raise ValueError(f"alert level must be one of {LEVELS}, got {level!r}")
        if self.run_name:
            title = f"{self.run_name}: {title}"
        now = self.clock()
        with self._lock:
            last = self._last_sent.get(kind)
            suppressed = last is not None and now - last < self.min_interval_s
            if suppressed:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            else:
                n = self._suppressed.pop(kind, 0)
                if n:
                    text += f"\n({n} more '{kind}' alert{'s' if n > 1 else ''} suppressed since the last one)"
                self._last_sent[kind] = now
                self._delivered.append((title, text, level))
            sinks = list(self._sinks)
        log_fn = {"INFO": log.info, "WARN": log.warning, "ERROR": log.error}[level]
        log_fn("ALERT%s [%s] %s: %s", " (rate-limited)" if suppressed else "", kind, title, text)
        self._record({"time": time.time(), "kind": kind, "level": level, "title": title, "text": text,
                      "step": step, "suppressed": suppressed})
        if not suppressed and self.active:
            self._enqueue(sinks, title, text, level)
        return not suppressed

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) until queued alerts have gone out."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._queue.unfinished_tasks

    def close(self, timeout_s: float = 10.0) -> None:
        self.flush(timeout_s)
        with self._lock:
            self._sinks = [(n, s) for n, s in self._sinks if n != "wandb"]

    # ------------------------------------------------------------------ internals
    def _record(self, row: dict) -> None:
        if not self.log_file:
            return
        try:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as e:  # a full disk must not turn an alert into a crash
            log.error("could not record alert in %s: %s", self.log_file, e)

    def _enqueue(self, sinks, title, text, level) -> None:
        for name, sink in sinks:
            self._queue.put((name, sink, title, text, level))
        with self._lock:
            if self._worker is None:  # a daemon: it never keeps a finished process alive
                self._worker = threading.Thread(target=self._deliver, name="kinoe-alerts", daemon=True)
                self._worker.start()

    def _deliver(self) -> None:
        while True:
            name, sink, title, text, level = self._queue.get()
            try:
                sink(title, text, level)
            except Exception as e:  # noqa: BLE001 - an alert channel failing must not stop training
                log.error("alert via %s failed: %s: %s", name, type(e).__name__, e)
            finally:
                self._queue.task_done()
