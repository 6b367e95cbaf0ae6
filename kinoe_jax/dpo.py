"""DPO is an objective of the one training loop; this command is `python -m kinoe_jax.train`.

    python -m kinoe_jax.dpo --gin_file=gin_configs/runs/dpo_tiny_ja.gin --workdir=DIR

The gin file sets `train.objective = @dpo()`; the objective is kinoe_jax/training/objectives/dpo.py.
"""

import sys

from kinoe_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
