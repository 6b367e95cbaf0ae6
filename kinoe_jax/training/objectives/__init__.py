"""Training objectives: what one run of the training loop (kinoe_jax/training/loop.py) optimises.

    train.objective = @causal_lm()    # pretraining and SFT (the default)
    train.objective = @dpo()          # preference tuning against a frozen reference

base.py says what an objective provides; trainable.py splits the parameters into the part the
optimizer updates and the frozen rest (everything, or only LoRA adapters).
"""

from kinoe_jax.training.objectives.base import Objective, RunInfo, TrainData
from kinoe_jax.training.objectives.causal_lm import CausalLM
from kinoe_jax.training.objectives.dpo import DPO

__all__ = ["CausalLM", "DPO", "Objective", "RunInfo", "TrainData"]
