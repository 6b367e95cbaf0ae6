"""Packing for SFT: seqio's decoder packing, with the loss mask the task computed."""

from __future__ import annotations

import gin
import seqio
import tensorflow as tf

Spec = seqio.FeatureConverter.FeatureSpec

# Values of the task feature "trained_on". seqio's packing drops zeros from every feature (zero
# is padding to it), so the mask is stored shifted by one and shifted back after packing.
PROMPT, TRAINED = 1, 2


@gin.configurable
class SftFeatureConverter(seqio.LMFeatureConverter):
    """Like seqio's LM converter, but `decoder_loss_weights` is 1 only where the task's
    `trained_on` says TRAINED (assistant replies and their <|end|>), 0 on prompts and padding.

    Packing moves `targets` and `trained_on` together (they have the same length), so each flag
    stays on its token. Bind it in gin with
        make_feature_converter.converter_cls = @SftFeatureConverter
        task_feature_lengths.features = ("targets", "trained_on")
    """

    TASK_FEATURES = {"targets": Spec(dtype=tf.int32), "trained_on": Spec(dtype=tf.int32)}

    def _convert_example(self, features):
        out = super()._convert_example(features)
        out["decoder_loss_weights"] = tf.cast(tf.equal(features["trained_on"], TRAINED), tf.int32)
        return out
