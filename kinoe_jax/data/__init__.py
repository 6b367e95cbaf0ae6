"""Data: seqio tasks and mixtures, preprocessors, the phase schedule, chat data and the built-in corpus.

Importing it changes nothing: entry points call kinoe_jax.hardware.runtime.setup() first, which
hides accelerators from TensorFlow before seqio loads it.
"""
