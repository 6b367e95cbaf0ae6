"""Every benchmark in tools/bench/ runs with --smoke: its own code at a toy size, as a user starts
it, exiting 0 with the line that carries its result.

Each script names that line in RESULT_LINE, a regular expression read here from its source
(importing a benchmark would start JAX in this process). A new script is picked up by the glob.
"""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

from paths import REPO

pytestmark = pytest.mark.slow

BENCHES = sorted(glob.glob(os.path.join(REPO, "tools", "bench", "[!_]*.py")))


def result_line(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RESULT_LINE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{os.path.relpath(path, REPO)} names no RESULT_LINE (the regex of its result line)")


def test_every_benchmark_is_found():
    names = {os.path.basename(p) for p in BENCHES}
    assert {"bench_train_vs_hf.py", "bench_accelerator.py", "sweep_chips.py"} <= names, names


@pytest.mark.parametrize("path", BENCHES, ids=os.path.basename)
def test_smoke_run_prints_its_result(path):
    pattern = re.compile(result_line(path), re.M)
    # The tests' 8 simulated devices are theirs: a benchmark starts on what a user's machine has.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, path, "--smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert pattern.search(proc.stdout), f"no line matching {pattern.pattern!r} in:\n{proc.stdout[-3000:]}"
