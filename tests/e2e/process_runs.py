"""`python -m kinoe_jax.train` as N processes on localhost sharing 8 simulated CPU devices (gloo
collectives), on the built-in corpus shuffled and packed as a real run reads it."""

import os
import subprocess
import sys
import threading
import time

import pytest
from paths import REPO
from ports import free_port

_CACHE: list[str] = []


def _compilation_cache() -> str:
    """One persistent XLA cache for the workers of a test session (the same step compiles once)."""
    if not _CACHE:
        import atexit
        import shutil
        import tempfile

        _CACHE.append(tempfile.mkdtemp(prefix="kinoe_process_runs_jit_"))
        atexit.register(shutil.rmtree, _CACHE[0], True)
    return _CACHE[0]


def bindings(total_steps: int, extra=()) -> list[str]:
    from conftest import TEST_MODEL  # lazily: conftest would give a worker 8 devices

    return [*TEST_MODEL, "make_mesh.data = 1", "make_mesh.fsdp = 8", f"train.total_steps = {total_steps}",
            "peak_flops_per_device.override = 1e12", *extra]


def start(workdir, num_processes: int, total_steps: int, extra=()) -> list[subprocess.Popen]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // num_processes}",
               WANDB_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=_compilation_cache(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "kinoe_jax.train", f"--workdir={workdir}", "--gin_file=gin_configs/mesh/fsdp.gin"]
    cmd += [f"--gin_bindings={b}" for b in bindings(total_steps, extra)]
    if num_processes > 1:
        cmd += [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={num_processes}"]
    return [subprocess.Popen(cmd + ([f"--process_id={i}"] if num_processes > 1 else []), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(num_processes)]


def wait_all(groups, timeout: float = 900) -> list[list[dict]]:
    """Every process's status, stdout, stderr (the terminal's two streams) and end time."""
    results = [[{} for _ in g] for g in groups]

    def reap(p, slot):
        out, err = p.communicate()
        slot.update(rc=p.returncode, out=out, err=err, end=time.time())

    threads = [threading.Thread(target=reap, args=(p, results[i][j]), daemon=True)
               for i, g in enumerate(groups) for j, p in enumerate(g)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.1))
    if any(t.is_alive() for t in threads):
        for g in groups:
            for p in g:
                p.kill()
        pytest.fail(f"processes still running after {timeout} s")
    return results


def check_ok(results, what: str) -> None:
    for i, r in enumerate(results):
        assert r["rc"] == 0, f"{what}: process {i} exited {r['rc']}:\n{r['err'][-4000:]}"


def losses(workdir) -> dict[int, float]:
    from kinoe_jax.training.metrics_writer import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}
