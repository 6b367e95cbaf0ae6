"""Cleaning of Japanese pretraining corpora: normalisation, quality filters,
exact and near-duplicate removal, on one machine or on Apache Beam.

The command-line entry point is ``tools/prepare_corpus.py``; the defaults and
their reasons are in ``default_config.yaml``.
"""

from kinoe_jax.corpus.config import CorpusConfig, load_config
from kinoe_jax.corpus.filters import QualityFilter, normalize_text

__all__ = ["CorpusConfig", "QualityFilter", "load_config", "normalize_text"]
