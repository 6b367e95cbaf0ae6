"""seqio tasks over chat JSONL files, and the built-in SFT set.

Each task checks its files once in python when it is registered (what would be dropped, and
why, by file and line), then the tf.data stream applies the same checks on the fly.
"""

from __future__ import annotations

import logging
import os

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from kinoe_jax.data.pipeline import DataConfig
from kinoe_jax.data.pretraining import JsonlDataSource
from kinoe_jax.data.vocab import BUILTIN_DIR, get_vocabulary
from kinoe_jax.sft.converter import PROMPT, TRAINED
from kinoe_jax.data.chat.conversation import BadExample, check_length, check_messages, encode, parse_line
from kinoe_jax.data.chat.report import Report, scan

log = logging.getLogger(__name__)

SFT_BUILTIN = "kinoe_sft_builtin"
BUILTIN_SFT_DIR = os.path.join(BUILTIN_DIR, "sft")
BUILTIN_SFT_FILES = ("senryu.jsonl", "listening_a.jsonl", "listening_b.jsonl")


class SftDataError(ValueError):
    pass


def output_features(vocab=None):
    return {
        "targets": seqio.Feature(vocab or get_vocabulary(), add_eos=False, dtype=tf.int32),
        # PROMPT/TRAINED per token (see converter.py); a pass-through "vocabulary" because seqio
        # wants one for every feature.
        "trained_on": seqio.Feature(seqio.PassThroughVocabulary(TRAINED + 1), add_eos=False, dtype=tf.int32),
    }


def encode_line(line: str, vocab) -> tuple[list[int], list[int]]:
    """One JSONL line -> (ids, weights); BadExample for anything training must not see."""
    messages = check_messages(parse_line(line)["messages"])
    return encode(messages, vocab)


def tokenize_conversations(ds: tf.data.Dataset, output_features, sequence_length=None) -> tf.data.Dataset:
    """JSON lines -> {"targets", "trained_on"}; bad, too long or assistant-less lines are dropped."""
    vocab = output_features["targets"].vocabulary

    def py_encode(line):
        try:
            ids, weights = encode_line(line.numpy().decode("utf-8"), vocab)
        except (BadExample, UnicodeDecodeError):
            ids, weights = [], []
        flags = np.where(np.asarray(weights, bool), TRAINED, PROMPT).astype(np.int32)
        return np.asarray(ids, np.int32), flags

    def parse(line):
        ids, flags = tf.py_function(py_encode, [line], (tf.int32, tf.int32))
        ids.set_shape([None])
        flags.set_shape([None])
        return {"targets": ids, "trained_on": flags}

    max_len = (sequence_length or {}).get("targets")

    def trainable(ex):
        ok = tf.reduce_any(tf.equal(ex["trained_on"], TRAINED))
        if max_len:
            ok = tf.logical_and(ok, tf.size(ex["targets"]) <= max_len)
        return ok

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.filter(trainable)


def check_files(patterns, seq_len: int, vocab=None, progress: bool = True) -> Report:
    """The python twin of tokenize_conversations: every line it would drop, by file:line."""
    vocab = vocab or get_vocabulary()

    def handle(line):
        ids, weights = encode_line(line, vocab)
        check_length(ids, weights, seq_len)
        return len(ids)

    _, report = scan(patterns, handle, progress=progress)
    return report


def _default_seq_len() -> int:
    return DataConfig().seq_len  # the gin-bound training length


@gin.configurable
def register_sft_task(name: str, train_pattern, validation_pattern=None, seq_len: int | None = None,
                      strict: bool = False, vocab=None) -> seqio.Task:
    """Register a seqio task over chat JSONL files (a glob pattern or a list of them per split).

    Lines that cannot train are skipped and listed in the log; strict=True makes any of them an
    error. A split that ends up with no trainable example is always an error.
    """
    seq_len = seq_len or _default_seq_len()
    splits = {"train": train_pattern}
    if validation_pattern:
        splits["validation"] = validation_pattern
    for split, pattern in splits.items():
        report = check_files(pattern, seq_len, vocab, progress=jax.process_index() == 0)
        message = f"SFT task {name!r} {split} (seq_len {seq_len}): {report.summary()}"
        if report.kept == 0 or (strict and report.skipped):
            raise SftDataError(message)
        if jax.process_index() == 0:
            (log.warning if report.skipped else log.info)(message)
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=JsonlDataSource({k: _as_list(v) for k, v in splits.items()}),
        preprocessors=[tokenize_conversations],
        output_features=output_features(vocab),
    )


@gin.configurable
def register_sft_builtin(vocab=None, seq_len: int | None = None) -> None:
    """The shipped hand-written sets: senryu and active listening (kinoe_jax/data/builtin/sft)."""
    files = [os.path.join(BUILTIN_SFT_DIR, f) for f in BUILTIN_SFT_FILES]
    register_sft_task(SFT_BUILTIN, files, seq_len=seq_len, vocab=vocab)


def _as_list(pattern):
    return [pattern] if isinstance(pattern, str) else list(pattern)
