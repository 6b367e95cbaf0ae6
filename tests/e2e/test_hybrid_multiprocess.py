"""HSDP over two processes of 4 CPU devices each, the processes standing in for two hosts: FSDP
stays inside a process, data parallelism crosses them, and 20 steps lose what one device loses."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from paths import REPO, TESTS
from ports import free_port
from test_multihost import (
    HERE,
    _bindings,
    _check_ok,
    _compilation_cache,
    losses,
    wait_all,
)

STEPS = 20
HSDP = ["make_mesh.data = -1", "make_mesh.fsdp = 'inner'", "make_mesh.outer_data = None"]


def _start(workdir, num_processes: int, devices_per_process: int, extra=()) -> list:
    path = os.pathsep.join([HERE, TESTS, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               WANDB_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=_compilation_cache(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "kinoe_jax.train", f"--workdir={workdir}", "--gin_file=gin_configs/mesh/hsdp.gin"]
    cmd += [f"--gin_bindings={b}" for b in _bindings(STEPS, extra)]
    if num_processes > 1:
        cmd += [f"--coordinator_address=localhost:{free_port()}", f"--num_processes={num_processes}"]
    return [subprocess.Popen(cmd + ([f"--process_id={i}"] if num_processes > 1 else []), cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(num_processes)]


@pytest.mark.slow
def test_hsdp_over_two_processes_matches_one_device(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = ["make_mesh.data = 1", "make_mesh.fsdp = 1"]
    results = wait_all([_start(one, 1, 1, single), _start(two, 2, 4, HSDP)], timeout=900)
    _check_ok(results[0], "1 device")
    _check_ok(results[1], "2 processes x 4 devices")

    log = (two / "logs" / "process_0.log").read_text()
    m = re.search(r"mesh over 2 hosts: outer (\{.*?\}), inner (\{.*?\}); host of each device in mesh order: (\[.*?\])",
                  log)
    assert m, log[-3000:]
    assert ast.literal_eval(m.group(1))["data"] == 2 and ast.literal_eval(m.group(2))["fsdp"] == 4
    hosts = np.asarray(ast.literal_eval(m.group(3))).reshape(2, 4)  # (data, fsdp): tensor and expert are 1
    assert all(len(set(row)) == 1 for row in hosts), hosts  # every fsdp group inside one process
    assert set(hosts[:, 0]) == {0, 1}  # the data axis crosses them

    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a[STEPS] < a[1]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
