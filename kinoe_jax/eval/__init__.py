"""Evaluation: llm-jp-eval's dump formats and metrics, the built-in evaluation set, and the
downstream scores the training loop logs."""
