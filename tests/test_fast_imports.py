"""What the commands import before they check their input loads neither JAX nor TensorFlow, so a
bad path is named in a moment. Each module is imported alone in a fresh interpreter: once JAX is
loaded, a second import could not show which module pulled it in."""

import subprocess
import sys

import pytest

from paths import REPO

# The entry modules (their heavy imports wait for runtime.setup()), the input checks, and what the
# conversion tools import at their top (ConversionError, OutputExists).
FAST = ["kinoe_jax.train", "kinoe_jax.dpo", "kinoe_jax.aot", "kinoe_jax.generate", "kinoe_jax.config.inputs",
        "kinoe_jax.utils.atomic", "kinoe_jax.hf", "kinoe_jax.hf.mapping"]


@pytest.mark.parametrize("module", FAST)
def test_import_loads_neither_jax_nor_tensorflow(module):
    code = f"import sys, {module}; print(sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"
