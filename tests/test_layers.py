"""The house plan holds: imports point down the layers and no modules import each other in a
circle (function-level imports included). The contract is in pyproject.toml's [tool.importlinter]."""

import os
import subprocess
import sys

from paths import REPO


def test_import_contracts_are_kept():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    out = subprocess.run([lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    report = out.stdout + out.stderr
    assert out.returncode == 0, f"an import points the wrong way or closes a cycle:\n{report[-4000:]}"
    assert "2 kept, 0 broken" in report, report[-2000:]


def test_importing_the_package_starts_nothing():
    """Nothing runs on import: neither JAX nor TensorFlow is loaded by importing the layers' roots."""
    code = ("import sys, kinoe_jax.config.inputs, kinoe_jax.data, kinoe_jax.training, kinoe_jax.hardware;"
            "print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
