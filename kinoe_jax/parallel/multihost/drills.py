"""Deliberate failures: the fire drills of a launch, and what the multi-process tests inject."""

from __future__ import annotations

import os
import signal

import gin

from kinoe_jax.parallel.multihost.records import flush_logs


@gin.configurable
def fault_point(step: int, at_step: int | None = None, process: int | None = None, kind: str = "raise") -> None:
    """A deliberate failure after `at_step` in `process`.

    kind "raise" raises an exception; "kill" sends SIGKILL to this process (no Python cleanup,
    like an out-of-memory kill or a lost host).
    """
    if at_step is None or step != at_step:
        return
    import jax

    if process is not None and jax.process_index() != process:
        return
    if kind == "kill":
        flush_logs()
        os.kill(os.getpid(), signal.SIGKILL)
    if kind != "raise":
        raise ValueError(f"fault_point.kind must be 'raise' or 'kill', got {kind!r}")
    raise RuntimeError(f"injected fault in process {jax.process_index()} at step {step}")
