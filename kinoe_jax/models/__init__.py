from kinoe_jax.models.config import ModelConfig
from kinoe_jax.models.decoder import Transformer

__all__ = ["ModelConfig", "Transformer"]
