"""Joining a multi-process run: when to initialise JAX's runtime, and one log file per process."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time

import gin

log = logging.getLogger("kinoe_jax.multihost")

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
    # JAX's coordination service declares a process silent this long dead and aborts every other
    # one (JAX's default, 100 s, is longer than a team wants to wait). Its heartbeats come from a
    # background thread, so long compilations do not trip it.
    heartbeat_timeout_s: int = 30
    # Our own verdict on a silent process, which must come before JAX's abort so that the others
    # can end calmly (None: half of heartbeat_timeout_s).
    peer_silence_s: float | None = None
    shutdown_timeout_s: int = 300
    # Console verbosity of processes other than 0 (their log files always get INFO).
    other_console_level: str = "WARNING"
    # How long process 0 keeps the coordination service up after an error (its own or a peer's),
    # so that the other processes can read it, or finish recording theirs, before JAX aborts them.
    error_grace_s: float = 3.0

    def silence_s(self) -> float:
        return self.peer_silence_s if self.peer_silence_s is not None else self.heartbeat_timeout_s / 2


@dataclasses.dataclass
class Run:
    cfg: DistributedConfig
    workdir: str | None = None
    distributed: bool = False
    process_id: int = 0
    num_processes: int = 1
    log_path: str | None = None
    file_handler: logging.Handler | None = None
    threads: list = dataclasses.field(default_factory=list)
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def multi(self) -> bool:
        return self.distributed and self.num_processes > 1


_RUN: list[Run] = []


def current() -> Run | None:
    return _RUN[-1] if _RUN else None


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


def wants_distributed(cfg: DistributedConfig) -> tuple[bool, str]:
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


def join(workdir: str | None, cfg: DistributedConfig | None, overrides: dict) -> Run:
    """Join the multi-process run if there is one, then set up this process's log file."""
    cfg = cfg or DistributedConfig()
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.process_id is not None and cfg.num_processes is not None and not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f"process_id {cfg.process_id} must be in [0, num_processes={cfg.num_processes})")
    if cfg.silence_s() >= cfg.heartbeat_timeout_s:
        raise ValueError(f"DistributedConfig.peer_silence_s = {cfg.peer_silence_s} must be shorter than "
                         f"heartbeat_timeout_s = {cfg.heartbeat_timeout_s} (JAX aborts every process then)")
    run = Run(cfg=cfg, workdir=workdir)
    wanted, reason = wants_distributed(cfg)

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
        run.log_path, run.file_handler = _setup_logging(workdir, run)
        if run.multi:
            _native_stderr_to_log(run.log_path)
    log.info("process %d of %d on %s (%s); %d local / %d global devices", run.process_id,
             run.num_processes, socket.gethostname(), reason, jax.local_device_count(), jax.device_count())
    _RUN.append(run)
    return run


def _native_stderr_to_log(path: str) -> None:
    """What C++ writes to stderr (JAX's runtime, gloo, TensorFlow: their fatal messages and stack
    traces when a peer vanishes) goes to the log file; Python's stderr, and so our terminal lines,
    keeps the terminal."""
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and \
                getattr(h, "stream", None) in (sys.stderr, sys.__stderr__):
            h.setStream(terminal)
    sys.stderr = terminal


def _setup_logging(workdir: str, run: Run) -> tuple[str, logging.Handler]:
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
    return path, handler
