"""kinoe_jax: a JAX/Flax training stack for Japanese LLMs."""

__version__ = "0.1.0"
