"""Runs over several processes: start-up, per-process logs, and a calm end when one fails or dies.

JAX's multi-controller runtime does the real work: `jax.distributed.initialize` connects every
process to a coordination service hosted by process 0. This package adds what a team needs to
run and debug on many hosts:

* startup.py: when to initialise (explicit flags or gin, or JAX's own cluster detection: SLURM,
  Open MPI, Cloud TPU pods, GKE), and one log file per process, DIR/logs/process_<i>.log
  (interleaved output of many hosts is unreadable); only process 0 prints INFO to the console;
* records.py: THE first error of a run, published in the coordination service's key-value
  store and written to DIR/logs/first_error.json;
* peers.py: every process watches for that record, so the others stop within a second or two
  with one line naming the process that failed first, instead of hanging in a collective until a
  timeout buries the cause; and heartbeats, so a process that dies outright is named (with the
  newest committed checkpoint) and the others leave with status EXIT_PEER_LOST before JAX aborts
  them;
* report.py: `report_errors` around the run, `collective_failures` around the steps;
* drills.py: `fault_point`, a deliberate failure.
"""

from __future__ import annotations

from kinoe_jax.parallel.multihost import peers, records
from kinoe_jax.parallel.multihost.drills import fault_point
from kinoe_jax.parallel.multihost.peers import EXIT_PEER_LOST, on_peer_lost
from kinoe_jax.parallel.multihost.records import read_first_error
from kinoe_jax.parallel.multihost.report import collective_failures, report_errors
from kinoe_jax.parallel.multihost.startup import (
    DistributedConfig,
    Run,
    add_flags,
    current,
    detect_cluster,
    flag_values,
    wants_distributed,
)

__all__ = [
    "EXIT_PEER_LOST",
    "DistributedConfig",
    "add_flags",
    "collective_failures",
    "current",
    "detect_cluster",
    "fault_point",
    "finish",
    "flag_values",
    "initialize",
    "on_peer_lost",
    "read_first_error",
    "report_errors",
    "wants_distributed",
]


def initialize(workdir: str | None = None, cfg: DistributedConfig | None = None, **overrides) -> Run:
    """Join the multi-process run if there is one, set up this process's log file, and start
    watching the other processes.

    Must run before anything touches JAX devices. `overrides` (command-line flags) win over gin;
    None values are ignored. Safe to call in a single-process run: it only sets up the log.
    """
    from kinoe_jax.parallel.multihost import startup

    run = startup.join(workdir, cfg, overrides)
    records.set_aside_old_record(run)
    if run.multi:
        peers.start(run)
    return run


def finish() -> None:
    """A clean end: stop watching before JAX's shutdown barrier takes the service down."""
    run = current()
    if run is None:
        return
    if run.multi:
        peers.finished(run)
    run.stopping.set()
    for t in run.threads:
        t.join(timeout=5)
    if run.distributed:
        import jax

        jax.distributed.shutdown()
