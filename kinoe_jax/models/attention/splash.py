"""Pallas splash attention (attention_impl "splash", the TPU's): block-sparse flash attention.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) visits only the key blocks a
query block can see under the causal (and sliding-window) mask, isolates packed documents by
their segment ids, and takes grouped-query heads natively. Its forward output and log-sum-exp
are named KERNEL_RESIDUAL so that the dots remat policies keep them instead of rerunning the
kernel inside the backward pass.

Elsewhere than on a TPU it runs in Pallas interpret mode: slow, but the same kernel, which is
how its numerics are tested on a CPU.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from kinoe_jax.models.attention import sharded
from kinoe_jax.models.attention.blocked import KERNEL_RESIDUAL
from kinoe_jax.hardware.runtime import mesh_platform

LANES = 128  # the kernel's tiles are whole multiples of a TPU vector register's lanes


def block_sizes_for(seq_len: int, block_q: int, block_kv: int) -> tuple[int, int]:
    """The configured blocks, capped at the sequence; a clear error where they cannot tile it."""
    if seq_len % LANES:
        raise ValueError(f"attention_impl 'splash' needs a sequence length that is a multiple of {LANES}, "
                         f"got {seq_len}")
    out = []
    for name, block in (("attention_block_q", block_q), ("attention_block_kv", block_kv)):
        b = min(block, seq_len)
        if b % LANES or seq_len % b:
            raise ValueError(f"ModelConfig.{name} = {block} does not tile sequence length {seq_len} "
                             f"(it must divide it and be a multiple of {LANES})")
        out.append(b)
    return out[0], out[1]


def _mask(seq_len: int, window):
    shape = (seq_len, seq_len)
    if window is not None and window < seq_len:
        # Query i sees keys i - window + 1 .. i: the same rule as attention_mask.
        return sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    return sa.CausalMask(shape)


def make_kernel(seq_len: int, num_heads: int, window, block_q: int, block_kv: int, head_shards: int,
                length_shards: int, interpret: bool, block_q_dkv: int | None = None, block_kv_dkv: int | None = None):
    """The kernel and its block tables for one shape. The tables are computed in numpy and
    cached by the Pallas library itself; here they become constants of the trace. The backward
    (fused dq/dkv) tiles default to the forward's."""
    bq_dkv, bkv_dkv = block_q_dkv or block_q, block_kv_dkv or block_kv
    blocks = sa.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                           block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv, block_kv_dkv_compute=bkv_dkv,
                           use_fused_bwd_kernel=True)
    mask = sa.MultiHeadMask([_mask(seq_len, window)] * num_heads)
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=head_shards, q_seq_shards=length_shards,
                              residual_checkpoint_name=KERNEL_RESIDUAL, interpret=interpret)


def splash_attention(q, k, v, segment_ids, sliding_window=None, block_q: int = 512, block_kv: int = 512,
                     interpret: bool | None = None, rules=sharded.LOGICAL_AXIS_RULES, block_q_dkv: int = 0,
                     block_kv_dkv: int = 0):
    """q [b, t, h, d]; k, v [b, t, kv, d]; segment_ids [b, t] -> [b, t, h, d] (q's dtype).

    `rules` is the logical-axis table that splits it over the mesh (tests try others);
    block_q_dkv / block_kv_dkv are the backward's tiles (0: the forward's)."""
    b, t, h, d = q.shape
    bq, bkv = block_sizes_for(t, block_q, block_kv)
    bq_dkv, bkv_dkv = block_sizes_for(t, block_q_dkv or bq, block_kv_dkv or bkv)
    mesh = sharded.current_mesh()
    if interpret is None:
        interpret = mesh_platform() != "tpu"
    if mesh is None:
        split = sharded.Split(None, None, None, 1, 1)
    else:
        split = sharded.plan(q.shape, k.shape[2], mesh, rules)
    kernel = make_kernel(t, h, sliding_window, bq, bkv, split.head_shards, split.length_shards, interpret,
                         bq_dkv, bkv_dkv)
    scale = d ** -0.5

    def per_device(q, k, v, seg_q, seg_kv, kernel):
        qh = (q * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [b, h, t, d]
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        run = lambda q1, k1, v1, sq, skv: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=sq, kv=skv))  # noqa: E731
        return jax.vmap(run)(qh, kh, vh, seg_q, seg_kv).transpose(0, 2, 1, 3)

    if mesh is None:
        return per_device(q, k, v, segment_ids, segment_ids, kernel)
    table_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        split.heads, split.length)))
    return sharded.run(per_device, q, k, v, segment_ids, split, mesh, extra=(kernel,), extra_specs=(table_spec,))
