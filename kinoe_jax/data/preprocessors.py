"""seqio preprocessors. All are TF graph ops (or pure py_functions), so the tf.data iterator
state can be checkpointed and a resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

import json

import seqio
import tensorflow as tf

from kinoe_jax.data.vocab import EOS_ID


def parse_jsonl(ds: tf.data.Dataset, text_field: str = "text") -> tf.data.Dataset:
    """JSON line -> {"targets": text}. Lines that fail to parse or lack the field become empty
    and are dropped here; tools/prepare_corpus.py is where bad input is counted and reported."""

    def extract(line: str) -> str:
        value = json.loads(line).get(text_field, "")
        return value if isinstance(value, str) else ""

    return lines_to_text(ds, extract)


def lines_to_text(ds: tf.data.Dataset, line_to_text) -> tf.data.Dataset:
    """Map each text line through `line_to_text` (plain Python) into {"targets": text}; lines it
    cannot read (or that give empty text) are dropped."""

    def extract(line):
        try:
            return line_to_text(line.numpy().decode("utf-8"))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return ""

    def parse(line):
        text = tf.py_function(extract, [line], tf.string)
        text.set_shape([])
        return {"targets": text}

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.filter(lambda ex: tf.strings.length(ex["targets"]) > 0)


@seqio.map_over_dataset
def append_eos(ex):
    """Mark the end of each document before it is cut into training-length chunks."""
    return {**ex, "targets": tf.concat([ex["targets"], tf.constant([EOS_ID], ex["targets"].dtype)], 0)}


def split_to_length(ds: tf.data.Dataset, sequence_length) -> tf.data.Dataset:
    """Cut long documents into pieces of at most the sequence length, so packing never truncates."""
    length = sequence_length["targets"]

    def split(ex):
        tokens = ex["targets"]
        n = tf.shape(tokens)[0]
        pad = (length - n % length) % length
        padded = tf.pad(tokens, [[0, pad]], constant_values=-1)
        chunks = tf.reshape(padded, [-1, length])
        chunks = tf.RaggedTensor.from_tensor(chunks, padding=-1)
        return tf.data.Dataset.from_tensor_slices({"targets": chunks})

    return ds.flat_map(split)
