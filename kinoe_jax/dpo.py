"""DPO is an objective of the one training loop; this module is a thin alias.

    python -m kinoe_jax.dpo --gin_file=gin_configs/runs/dpo_tiny_ja.gin --workdir=DIR

is `python -m kinoe_jax.train` with the same flags (the gin file sets `train.objective = @dpo()`).
The objective itself is kinoe_jax/objectives/dpo.py.
"""

from __future__ import annotations

import sys

from kinoe_jax import cli

if __name__ == "__main__":  # a bad --gin_file is named before TensorFlow and JAX load
    cli.precheck({"--gin_file": cli.gin_file})

from kinoe_jax.objectives.dpo import BUILTIN_PREFERENCES, dpo_terms, pair_logps, step_indices  # noqa: F401,E402
from kinoe_jax.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
