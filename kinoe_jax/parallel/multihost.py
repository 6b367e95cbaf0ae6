"""Runs over several processes: start-up, per-process logs, and reporting the first failure.

JAX's multi-controller runtime does the real work: `jax.distributed.initialize` connects every
process to a coordination service hosted by process 0, which also watches heartbeats (a process
that vanishes, e.g. `kill -9`, makes every other one abort after `heartbeat_timeout_s`). This
module adds the parts a team needs to debug a run on many hosts:

* when to initialise: explicit flags/gin (coordinator address, process count, process id), or
  JAX's own cluster detection (SLURM, Open MPI, Cloud TPU pods, GKE) when it finds more than
  one process;
* one log file per process, DIR/logs/process_<i>.log (interleaved output of many hosts is
  unreadable); only process 0 prints INFO to the console;
* the first Python error of any process is published in the coordination service's key-value
  store (and in DIR/logs/first_error.json). A watcher thread in every process waits on that key,
  so the others stop within a second or two with one line naming the process that failed first,
  instead of hanging in a collective until a timeout buries the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback

import gin

log = logging.getLogger("kinoe_jax.multihost")

FIRST_ERROR_KEY = "kinoe_jax/first_error"
ERROR_FILE = "first_error.json"
_LOG_FORMAT = "%(asctime)s p{pid} %(levelname)s %(name)s: %(message)s"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (flags of kinoe_jax.train override these)."""

    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # GPUs this process drives (default: JAX's)
    auto_detect: bool = True  # let JAX recognise SLURM / MPI / TPU pods / GKE
    initialization_timeout_s: int = 300
    # A process silent this long is declared dead and every other one stops. JAX's default
    # (100 s) is longer than a team wants to wait; heartbeats come from a background thread,
    # so long compilations do not trip it.
    heartbeat_timeout_s: int = 30
    shutdown_timeout_s: int = 300
    # Console verbosity of processes other than 0 (their log files always get INFO).
    other_console_level: str = "WARNING"
    # How long process 0 keeps the coordination service up after an error (its own or a peer's),
    # so that the other processes can read it, or finish recording theirs, before JAX aborts them.
    error_grace_s: float = 3.0


@dataclasses.dataclass
class _Run:
    cfg: DistributedConfig
    workdir: str | None = None
    distributed: bool = False
    process_id: int = 0
    num_processes: int = 1
    log_path: str | None = None
    watcher: threading.Thread | None = None
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)


_RUN: _Run | None = None


# ----------------------------------------------------------------------------- start-up
def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of a cluster environment JAX recognises, or None.

    Uses JAX's own detectors so that what we detect is exactly what `jax.distributed.initialize()`
    will use. A count that cannot be read (e.g. GKE without the `kubernetes` package) is
    reported as -1: the run is treated as multi-process and JAX reports the real problem.
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # the detectors moved: fall back to the explicit flags
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if not env.is_env_present():
                continue
        except Exception:  # noqa: BLE001 - a detector probing an absent service
            continue
        try:
            count = int(env.get_process_count())
        except Exception:  # noqa: BLE001
            count = -1
        return getattr(env, "name", env.__name__), count
    return None


def _wants_distributed(cfg: DistributedConfig) -> tuple[bool, str]:
    if cfg.num_processes is not None:
        if cfg.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {cfg.num_processes}")
        return cfg.num_processes > 1, f"{cfg.num_processes} processes requested"
    if cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True, "coordinator address given"
    if cfg.auto_detect:
        found = detect_cluster()
        if found and found[1] != 1:
            return True, f"{found[0]} cluster with {found[1] if found[1] > 0 else 'several'} processes"
    return False, "single process"


def add_flags(parser) -> None:
    """--coordinator_address / --num_processes / --process_id (else gin DistributedConfig, else JAX's detection)."""
    group = parser.add_argument_group("multi-process runs (omit on SLURM, TPU pods and GKE: detected)")
    group.add_argument("--coordinator_address", default=None, help="host:port of process 0's coordination service")
    group.add_argument("--num_processes", type=int, default=None, help="number of processes in the run")
    group.add_argument("--process_id", type=int, default=None, help="this process's index, 0 .. num_processes-1")


def flag_values(args) -> dict:
    return {k: getattr(args, k, None) for k in ("coordinator_address", "num_processes", "process_id")}


def initialize(workdir: str | None = None, cfg: DistributedConfig | None = None, **overrides) -> _Run:
    """Join the multi-process run if there is one, then set up this process's log file.

    Must run before anything touches JAX devices. `overrides` (command-line flags) win over gin;
    None values are ignored. Safe to call in a single-process run: it only sets up the log.
    """
    global _RUN
    cfg = cfg or DistributedConfig()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.process_id is not None and cfg.num_processes is not None and not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f"process_id {cfg.process_id} must be in [0, num_processes={cfg.num_processes})")
    run = _Run(cfg=cfg, workdir=workdir)
    wanted, reason = _wants_distributed(cfg)

    import jax

    if wanted and not jax.distributed.is_initialized():
        # CPU hosts (and the localhost tests) need a collectives backend for cross-process
        # reductions; gloo ships with jaxlib. Accelerators ignore this setting.
        if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        ids = list(cfg.local_device_ids) if cfg.local_device_ids is not None else None
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
            process_id=cfg.process_id, local_device_ids=ids,
            cluster_detection_method=None if cfg.auto_detect else "deactivate",
            initialization_timeout=cfg.initialization_timeout_s,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
            shutdown_timeout_seconds=cfg.shutdown_timeout_s)
    run.distributed = jax.distributed.is_initialized()
    run.process_id, run.num_processes = jax.process_index(), jax.process_count()
    if workdir:
        run.log_path = _setup_logging(workdir, run)
    log.info("process %d of %d on %s (%s); %d local / %d global devices", run.process_id,
             run.num_processes, socket.gethostname(), reason, jax.local_device_count(), jax.device_count())
    if run.distributed and run.num_processes > 1:
        run.watcher = threading.Thread(target=_watch_for_errors, args=(run,), name="kinoe-error-watch", daemon=True)
        run.watcher.start()
    _RUN = run
    return run


def _setup_logging(workdir: str, run: _Run) -> str:
    """DIR/logs/process_<i>.log gets everything; the console of processes > 0 only warnings."""
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    path = os.path.join(logs, f"process_{run.process_id}.log")
    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    fmt = logging.Formatter(_LOG_FORMAT.format(pid=run.process_id))
    for h in root.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            if not getattr(h, "kinoe_calm", False):  # the calm console prints bare lines
                h.setFormatter(fmt)
            if run.process_id:
                h.setLevel(logging.getLevelName(run.cfg.other_console_level.upper()))
    handler = logging.FileHandler(path, encoding="utf-8")  # appends: a resumed run continues its log
    handler.setFormatter(fmt)
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    logging.captureWarnings(True)
    log.info("---- %s: process %d of %d, pid %d, argv %s", time.strftime("%Y-%m-%d %H:%M:%S"),
             run.process_id, run.num_processes, os.getpid(), " ".join(sys.argv))
    return path


# ----------------------------------------------------------------------------- errors
def _client():
    from jax._src import distributed

    return distributed.global_state.client


def _describe(record: dict) -> str:
    where = f" (full traceback in {record['log']})" if record.get("log") else ""
    return (f"process {record['process']} of {record['num_processes']} on {record['host']} failed first: "
            f"{record['error']}{where}")


def _publish(record: dict, run: _Run) -> dict:
    """Publish `record` as THE first error unless another process got there first; return the winner."""
    client = _client() if run.distributed else None
    winner = record
    if client is not None:
        try:
            client.key_value_set(FIRST_ERROR_KEY, json.dumps(record), allow_overwrite=False)
        except Exception:  # noqa: BLE001 - the key exists (someone failed earlier) or the service is gone
            try:
                winner = json.loads(client.key_value_try_get(FIRST_ERROR_KEY))
            except Exception:  # noqa: BLE001
                winner = _read_error_file(run) or record
    if winner is record and run.workdir:
        _write_error_file(run, record)
    return winner


def _write_error_file(run: _Run, record: dict) -> None:
    """A post-mortem record in the workdir; O_EXCL keeps the first writer's on a shared disk."""
    path = os.path.join(run.workdir, "logs", ERROR_FILE)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False)
        f.write("\n")


def _read_error_file(run: _Run) -> dict | None:
    if not run.workdir:
        return None
    try:
        with open(os.path.join(run.workdir, "logs", ERROR_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_first_error(workdir: str) -> dict | None:
    """The first error a multi-process run recorded in DIR/logs/first_error.json, if any."""
    return _read_error_file(_Run(cfg=DistributedConfig(), workdir=workdir))


def _flush_logs() -> None:
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()


def _stop_now(message: str, linger_s: float = 0.0) -> None:
    """Leave: the other processes are gone or failing, collectives would hang.

    `linger_s` keeps this process (and the coordination service, if it hosts it) alive that long
    after saying why, so that a failing peer can finish its own record before the service goes."""
    log.error(message)
    print(f"kinoe_jax: {message}", file=sys.stderr, flush=True)
    _flush_logs()
    if linger_s > 0:
        time.sleep(linger_s)
    os._exit(1)


def _watch_for_errors(run: _Run) -> None:
    """Block on the first-error key; when any other process publishes one, stop this process."""
    client = _client()
    unreachable_since = None
    while not run.stopping.is_set():
        try:
            value = client.blocking_key_value_get(FIRST_ERROR_KEY, 1000)
        except Exception as e:  # noqa: BLE001
            text = str(e)
            if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
                unreachable_since = None
                continue
            # The coordination service (process 0) does not answer: it died or is shutting down.
            if run.stopping.is_set():
                return
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since < 5.0:
                time.sleep(0.5)
                continue
            record = _read_error_file(run)
            if record:
                _stop_now(_describe(record))
            _stop_now(f"process 0 (the coordinator) no longer answers: it probably died; see its log "
                      f"{_peer_log(run, 0)} ({text.splitlines()[0] if text else type(e).__name__})")
            return
        if run.stopping.is_set():
            return
        record = json.loads(value)
        if record.get("process") == run.process_id:
            return  # our own error: the failing thread handles the exit
        # Process 0 hosts the coordination service: leaving at once would make JAX abort the
        # failing process before it has written DIR/logs/first_error.json.
        _stop_now(_describe(record) + f"; stopping process {run.process_id}",
                  linger_s=run.cfg.error_grace_s if run.process_id == 0 else 0.0)
        return


def _append_to_log(run: _Run, text: str) -> None:
    if run.log_path:
        with contextlib.suppress(OSError), open(run.log_path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} p{run.process_id} ERROR {text}\n")


def _peer_log(run: _Run, pid: int) -> str:
    return os.path.join(run.workdir, "logs", f"process_{pid}.log") if run.workdir else f"process {pid}'s output"


# Runtime errors that a process sees when a *peer* died (its sockets closed, the service gone).
_PEER_FAILURE_HINTS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused",
                       "socket closed", "unavailable", "deadline_exceeded", "coordination service",
                       "heartbeat", "barrier")


def _maybe_secondary(e: BaseException) -> bool:
    if type(e).__name__ not in ("JaxRuntimeError", "XlaRuntimeError"):
        return False
    text = str(e).lower()
    return "resource_exhausted" not in text and any(h in text for h in _PEER_FAILURE_HINTS)


def _await_root_cause(run: _Run, e: BaseException) -> None:
    """A collective failed here, most likely because another process died. Give the real cause
    time to surface: a peer's published error (the watcher thread then stops us with its line),
    or JAX's heartbeat verdict, which aborts this process naming the silent process. Only if
    neither comes is this error reported as the first."""
    wait = run.cfg.heartbeat_timeout_s + 5
    msg = (f"process {run.process_id}: a collective failed ({type(e).__name__}: "
           f"{(str(e).strip().splitlines() or [''])[0][:200]}); another process probably died - waiting up "
           f"to {wait} s for the coordination service to name it")
    log.error(msg)
    print(f"kinoe_jax: {msg}", file=sys.stderr, flush=True)
    _flush_logs()
    time.sleep(wait)


@contextlib.contextmanager
def report_errors():
    """Wrap the run: an exception here becomes the run's first error, seen by every process.

    Single-process runs just log the traceback and re-raise. In a multi-process run this process
    exits with status 1 (without the shutdown barrier, which would wait for processes that are
    stuck in a collective), after every other process has been told.
    """
    try:
        yield
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt and SystemExit stop a host too
        if isinstance(e, SystemExit) and not e.code:
            raise
        run = _RUN
        if run is None:
            raise
        tb = traceback.format_exc()
        if not (run.distributed and run.num_processes > 1):
            _append_to_log(run, f"run failed:\n{tb}")  # the console gets Python's own traceback
            raise
        log.error("process %d failed:\n%s", run.process_id, tb)
        if _maybe_secondary(e):
            _await_root_cause(run, e)
        run.stopping.set()
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        record = {"process": run.process_id, "num_processes": run.num_processes, "host": socket.gethostname(),
                  "error": f"{type(e).__name__}: {first_line}", "time": time.time(), "log": run.log_path}
        winner = _publish(record, run)
        if winner.get("process") == run.process_id:
            print(f"kinoe_jax: {_describe(winner)}", file=sys.stderr, flush=True)
            if run.process_id == 0:
                # Process 0 hosts the key-value store: keep it up while the others read the error.
                time.sleep(run.cfg.error_grace_s)
        else:
            print(f"kinoe_jax: {_describe(winner)}; process {run.process_id} then failed with "
                  f"{record['error']}", file=sys.stderr, flush=True)
        _flush_logs()
        os._exit(1)


def finish() -> None:
    """A clean end: stop the watcher before JAX's shutdown barrier takes the service down."""
    run = _RUN
    if run is None:
        return
    run.stopping.set()
    if run.watcher is not None:
        run.watcher.join(timeout=5)
    if run.distributed:
        import jax

        jax.distributed.shutdown()


# ----------------------------------------------------------------------------- fault injection
@gin.configurable
def fault_point(step: int, at_step: int | None = None, process: int | None = None, kind: str = "raise") -> None:
    """A deliberate failure after `at_step` in `process` (tests and fire drills of a launch).

    kind "raise" raises an exception; "kill" sends SIGKILL to this process (no Python cleanup,
    like an out-of-memory kill or a lost host).
    """
    if at_step is None or step != at_step:
        return
    import jax

    if process is not None and jax.process_index() != process:
        return
    if kind == "kill":
        _flush_logs()
        os.kill(os.getpid(), signal.SIGKILL)
    if kind != "raise":
        raise ValueError(f"fault_point.kind must be 'raise' or 'kill', got {kind!r}")
    raise RuntimeError(f"injected fault in process {jax.process_index()} at step {step}")
