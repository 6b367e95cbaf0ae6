"""Data: seqio tasks and mixtures, preprocessors, the phase schedule and the built-in corpus.

TensorFlow (used by seqio) must not take accelerator memory from JAX: importing this package
hides every GPU/TPU from TensorFlow before anything else touches it.
"""

import os

from kinoe_jax import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every entry point imports this package first: JAX's platform is settled here too, before any
# backend starts (a machine without accelerators stays on the CPU, quietly).
platform.setup()

with platform.without_cuda_noise(platform.TF_IMPORT_NOISE):
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type
        pass
