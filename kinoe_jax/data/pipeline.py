"""From a seqio task/mixture to packed batches, and how a step's global batch is laid out.

A step's batch is [grad_accum, global_batch / grad_accum, seq_len] on the mesh (micro-batch major);
`batch_sharding` splits its rows over the data axes and `rows_by_process` says which rows each
process's devices hold. The training stream that fills them is kinoe_jax/data/sharded_stream.py.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.sharding import NamedSharding

from kinoe_jax.data.vocab import BOS_ID
from kinoe_jax.parallel import sharding as shd

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    mixture: str = "kinoe_ja_builtin"
    seq_len: int = 128
    global_batch: int = 16  # sequences per optimizer step, summed over every process
    grad_accum: int = 1  # micro-batches per step (global_batch must divide evenly)
    # Streams the training data is cut into (seqio shards). Fixed when a run starts (None: the
    # process count then) and kept by its checkpoints, so a run resumed on another number of
    # processes continues the same global sequence. A multiple of the most hosts the run may get
    # keeps every host reading only what it trains on.
    data_shards: int | None = None
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


def train_dataset(cfg: DataConfig, shard: int | None = None, num_shards: int | None = None) -> tf.data.Dataset:
    """The endless, shuffled training batches of one seqio shard (default: this process's of all),
    global_batch / num_shards rows each."""
    num_shards = jax.process_count() if num_shards is None else num_shards
    return packed_dataset(cfg.mixture, "train", cfg.seq_len, cfg.global_batch // num_shards, shuffle=True,
                          seed=cfg.seed, num_epochs=None, shard_index=shard, num_shards=num_shards,
                          shuffle_buffer=cfg.shuffle_buffer)


def micro_batch_shape(cfg: DataConfig) -> tuple[int, int, int]:
    return cfg.grad_accum, cfg.global_batch // cfg.grad_accum, cfg.seq_len


def batch_sharding(mesh, cfg: DataConfig) -> NamedSharding:
    """Where a step's [grad_accum, rows, seq_len] batch lives: rows split over the data axes."""
    return NamedSharding(mesh, shd.batch_spec(mesh, micro_batch_shape(cfg)))


def rows_by_process(mesh, cfg: DataConfig) -> dict[int, tuple[int, int]]:
    """Process -> the rows [first, end) of every micro-batch that its devices hold."""
    shape = micro_batch_shape(cfg)
    out: dict[int, tuple[int, int]] = {}
    for device, index in batch_sharding(mesh, cfg).devices_indices_map(shape).items():
        first, end, _ = index[1].indices(shape[1])
        lo, hi = out.get(device.process_index, (first, end))
        out[device.process_index] = (min(lo, first), max(hi, end))
    return out


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
