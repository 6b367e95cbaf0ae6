"""Data: seqio tasks and mixtures, preprocessors, the phase schedule and the built-in corpus.

TensorFlow (used by seqio) must not take accelerator memory from JAX: importing this package
hides every GPU/TPU from TensorFlow before anything else touches it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
except (RuntimeError, ValueError):  # already initialised, or no such device type
    pass
