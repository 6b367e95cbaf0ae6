"""What a run says when one of its processes dies outright (kinoe_jax/parallel/multihost/peers.py
reaches the verdict): the newest committed checkpoint, the last step, and the crash alert."""

from __future__ import annotations

import os

from kinoe_jax.parallel import multihost
from kinoe_jax.training import checkpoint as ckpt
from kinoe_jax.training.resilience.alerts import Alerter


def watch(workdir: str, manager, guard) -> None:
    """Give the verdict the run's facts and its alert, from now until the process ends."""
    directory = os.fspath(manager.directory)

    def facts() -> dict:
        step = ckpt.newest_committed(directory)
        where = (f"step {step} ({os.path.join(directory, str(step))})" if step is not None
                 else "none yet (a restart begins at step 0)")
        return {"checkpoint": where, "checkpoint_step": step, "last_step": guard.last_step}

    def alert(record: dict) -> None:
        alerts = guard.alerts
        if not alerts.active:  # process 0 died: this process alerts in its place
            alerts = Alerter(run_name=os.path.basename(os.path.abspath(workdir)),
                             log_file=os.path.join(workdir, "alerts.jsonl"), active=True)
        alerts.send("crash", "run crashed: a process died",
                    f"{record['error']} (last completed step {record.get('last_step')})", "ERROR",
                    record.get("last_step"))
        alerts.flush(10)

    multihost.on_peer_lost(facts, alert)
