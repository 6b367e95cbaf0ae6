"""Batched generation and log-likelihood scoring (train, eval, sft and generate call it)."""

from kinoe_jax.inference.engine import Completion, Engine, LogLikelihood, PromptTooLong
from kinoe_jax.inference.loading import load_for_inference, use_workdir_tokenizer

__all__ = ["Completion", "Engine", "LogLikelihood", "PromptTooLong", "load_for_inference", "use_workdir_tokenizer"]
