"""What a person at the terminal sees during a run, and what only the log file gets.

The terminal shows what is being trained, the progress bar, one line per evaluation and per
checkpoint saved, alerts, warnings and errors, and the sample. Everything else (Orbax's save
threads, TensorFlow's and the CUDA libraries' notices, W&B's chatter, our own INFO lines) goes
only to DIR/logs/process_<i>.log; `--verbose` shows it all on the terminal as well.

Lines meant for the terminal are logged to the `kinoe_jax.utils.console` logger (`say()`), so they
also land in the log file, in order, with everything else.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

CONSOLE = logging.getLogger("kinoe_jax.utils.console")
_ALWAYS = ("kinoe_jax.utils.console", "kinoe_jax.training.resilience.alerts")


def say(message: str, *args) -> None:
    """One line for the person watching the run."""
    CONSOLE.info(message, *args)


# gin logs an error for every search path a config file is not under, before finding it in the
# next one (a file found nowhere is reported by kinoe_jax.config.gin_io instead).
_SEARCH_MISS = "Path not found: %s"


class _Calm(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _SEARCH_MISS:
            return False
        if record.name.startswith(_ALWAYS):
            return True
        if record.name.startswith("kinoe_jax"):
            return record.levelno >= logging.WARNING
        return record.levelno >= logging.ERROR  # libraries: only what went wrong


class _AroundProgressBar(logging.StreamHandler):
    """Writes through tqdm, so a line does not tear the progress bar apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup(verbose: bool = False) -> None:
    """Console logging for a command-line run (call before the run starts logging)."""
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    handler = _AroundProgressBar(sys.stderr)
    handler.kinoe_calm = not verbose  # multihost keeps this handler's format
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_Plain())
        handler.addFilter(_Calm())
    root.addHandler(handler)
    # absl routes Orbax's messages through its own handler when absl.logging was initialised.
    try:
        from absl import logging as absl_logging  # noqa: PLC0415 (optional: comes with JAX, not declared here)

        absl_logging.get_absl_handler().setLevel(logging.DEBUG if verbose else logging.ERROR)
    except Exception:  # noqa: BLE001 - absl is optional here
        pass


class _Plain(logging.Formatter):
    """Terminal lines: the message alone, with the level for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING and not record.name.startswith(_ALWAYS):
            return f"{record.levelname.lower()}: {text}"
        return text
