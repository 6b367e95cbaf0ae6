"""seqio Tasks and Mixtures: the built-in Japanese corpus and a factory for JSONL corpora."""

from __future__ import annotations

import functools
import os

import gin
import seqio
import tensorflow as tf

from kinoe_jax.data import preprocessors as prep
from kinoe_jax.data.vocab import BUILTIN_DIR, get_vocabulary

BUILTIN_CORPUS = "kinoe_ja_builtin"


class JsonlDataSource(seqio.FileDataSource):
    """Lines of JSON from .jsonl or .jsonl.gz shards; seqio shards the files over processes."""

    def __init__(self, split_to_filepattern, **kwargs):
        def read(filepattern):
            # seqio passes each file name as a string tensor: decide per file inside the graph.
            is_gz = tf.strings.regex_full_match(filepattern, r".*\.gz")
            compression = tf.where(is_gz, tf.constant("GZIP"), tf.constant(""))
            return tf.data.TextLineDataset(filepattern, compression_type=compression)

        super().__init__(read_file_fn=read, split_to_filepattern=split_to_filepattern, **kwargs)


def output_features(vocab=None):
    # EOS is appended by the preprocessors before chunking, not by seqio (which would trim it).
    return {"targets": seqio.Feature(vocab or get_vocabulary(), add_eos=False, dtype=tf.int32)}


def pretraining_preprocessors(text_field: str = "text"):
    return [
        functools.partial(prep.parse_jsonl, text_field=text_field),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
        prep.append_eos,
        prep.split_to_length,
    ]


def _check_pattern(name: str, split: str, pattern: str) -> None:
    if not tf.io.gfile.glob(pattern):  # gfile: corpora often live on gs:// or other remote stores
        raise FileNotFoundError(f"task {name!r}: no file matches the {split} pattern {pattern!r}")


@gin.configurable
def register_jsonl_task(name: str, train_pattern: str, validation_pattern: str | None = None,
                        text_field: str = "text", vocab=None) -> seqio.Task:
    """Register (or re-register) a pretraining task over JSONL(.gz) shards."""
    splits = {"train": train_pattern}
    if validation_pattern:
        splits["validation"] = validation_pattern
    for split, pattern in splits.items():
        _check_pattern(name, split, pattern)
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=JsonlDataSource(splits),
        preprocessors=pretraining_preprocessors(text_field),
        output_features=output_features(vocab),
    )


def register_builtin(vocab=None) -> None:
    corpus = os.path.join(BUILTIN_DIR, "corpus")
    register_jsonl_task(BUILTIN_CORPUS, os.path.join(corpus, "train", "*.jsonl"),
                        os.path.join(corpus, "validation", "*.jsonl"), vocab=vocab)


@gin.configurable
def register_mixture(name: str, rates: dict[str, float]) -> seqio.Mixture:
    """A seqio Mixture with per-task sampling rates (gin: register_mixture.rates = {...})."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(rates.items()))
