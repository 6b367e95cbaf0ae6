"""From a seqio task/mixture to packed, per-process batches with a checkpointable iterator."""

from __future__ import annotations

import dataclasses

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from kinoe_jax.data.vocab import BOS_ID

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    mixture: str = "kinoe_ja_builtin"
    seq_len: int = 128
    global_batch: int = 16  # sequences per optimizer step, summed over every process
    grad_accum: int = 1  # micro-batches per step (global_batch must divide evenly)
    shuffle_buffer: int = 1000
    seed: int = 0
    eval_mixture: str | None = None  # defaults to `mixture`
    eval_batches: int = 4


@gin.configurable
def make_feature_converter(pack: bool = True, converter_cls=None) -> seqio.FeatureConverter:
    """Packs examples into rows with segment ids and per-segment positions (T5X's converter).

    Swap it in gin for tasks with other features (SFT's loss mask, for instance).
    """
    return (converter_cls or seqio.DecoderFeatureConverter)(pack=pack, bos_id=BOS_ID)


@gin.configurable
def task_feature_lengths(seq_len: int, features: tuple[str, ...] = ("targets",)) -> dict[str, int]:
    return {k: seq_len for k in features}


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    # The only stateful ops are pure py_functions (JSON parsing): safe to leave out of checkpoints.
    opts.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    opts.deterministic = True
    return opts


def packed_dataset(name: str, split: str, seq_len: int, local_batch: int, *, shuffle: bool,
                   seed: int, num_epochs: int | None, shard_index: int | None = None,
                   num_shards: int | None = None, shuffle_buffer: int = 1000) -> tf.data.Dataset:
    """Packed batches of [local_batch, seq_len] for this process's shard of `name`."""
    shard_index = jax.process_index() if shard_index is None else shard_index
    num_shards = jax.process_count() if num_shards is None else num_shards
    provider = seqio.get_mixture_or_task(name)
    lengths = task_feature_lengths(seq_len)
    # Only a Task takes a buffer size; a Mixture's tasks shuffle with seqio's default buffer.
    extra = {"shuffle_buffer_size": shuffle_buffer} if isinstance(provider, seqio.Task) else {}
    ds = provider.get_dataset(
        lengths, split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(shard_index, num_shards), use_cached=False,
        trim_output_features=True, **extra)
    ds = make_feature_converter()(ds, lengths)
    ds = ds.batch(local_batch, drop_remainder=num_epochs is None)
    return ds.prefetch(2).with_options(_options())


def local_batch_size(cfg: DataConfig) -> int:
    n = jax.process_count()
    if cfg.global_batch % (n * cfg.grad_accum):
        raise ValueError(f"DataConfig.global_batch={cfg.global_batch} must be divisible by "
                         f"process_count ({n}) x grad_accum ({cfg.grad_accum})")
    return cfg.global_batch // n


def train_dataset(cfg: DataConfig) -> tf.data.Dataset:
    return packed_dataset(cfg.mixture, "train", cfg.seq_len, local_batch_size(cfg), shuffle=True,
                          seed=cfg.seed, num_epochs=None, shuffle_buffer=cfg.shuffle_buffer)


def eval_batches(cfg: DataConfig) -> list[dict[str, np.ndarray]]:
    """A fixed list of validation batches (the same every evaluation), padded to full size."""
    local = local_batch_size(cfg)
    ds = packed_dataset(cfg.eval_mixture or cfg.mixture, "validation", cfg.seq_len, local,
                        shuffle=False, seed=0, num_epochs=1)
    out = []
    for batch in ds.take(cfg.eval_batches).as_numpy_iterator():
        n = batch["decoder_input_tokens"].shape[0]
        if n < local:  # zero rows carry zero loss weight
            batch = {k: np.concatenate([v, np.zeros((local - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        out.append({k: batch[k] for k in FEATURES})
    return out


def to_micro_batches(batch: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
    """[local_batch, T] -> [grad_accum, local_batch // grad_accum, T] (micro-batch major)."""
    batch = {k: np.asarray(v) for k, v in batch.items() if k in FEATURES}
    return {k: v.reshape((grad_accum, v.shape[0] // grad_accum) + v.shape[1:]) for k, v in batch.items()
            if k in FEATURES}
