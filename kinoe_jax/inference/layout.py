"""How requests become fixed-shape arrays: bucket sizes, left-padded prompt batches, packed
log-likelihood rows. Pure numpy; the shapes chosen here are what bounds the number of compiles."""

from __future__ import annotations

import dataclasses

import numpy as np


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def next_cache_len(n: int) -> int:
    """The smallest of 2^k and 1.5 * 2^k holding n: a KV cache wastes at most a third of itself,
    and the lengths stay few (two per octave)."""
    p = next_pow2(n)
    return p * 3 // 4 if p >= 4 and p * 3 // 4 >= n else p


def batch_rows(n: int, batch_size: int) -> int:
    """Rows of every batch of a request of n items: batch_size when it takes several batches
    (a last, partly filled batch reuses the full batch's programs), else a power of two, so a
    lone prompt (the training sample) does not pay for a full batch."""
    return min(next_pow2(n), batch_size)


def groups(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of similar length (longest first), each at most batch_size."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclasses.dataclass
class PromptBatch:
    tokens: np.ndarray     # [rows, bucket] int32, prompts right-aligned (padding on the left)
    positions: np.ndarray  # [rows, bucket] int32, 0 at each prompt's first real token
    segments: np.ndarray   # [rows, bucket] int32, 1 on real tokens, 0 on padding
    row_ids: np.ndarray    # [rows] int32, the request index of each row (seeds its sampling)
    valid: np.ndarray      # [rows] int32, 0 for rows that only fill the batch shape
    lengths: np.ndarray    # [rows] int32, each prompt's length


def left_padded(prompts: list[list[int]], request_ids: list[int], rows: int, bucket: int) -> PromptBatch:
    """Left padding puts every prompt's last token in the same column, so all rows write the KV
    cache at one shared index; the per-row positions keep rotary embeddings as if unpadded."""
    tokens = np.zeros((rows, bucket), np.int32)
    positions = np.zeros((rows, bucket), np.int32)
    segments = np.zeros((rows, bucket), np.int32)
    row_ids = np.zeros((rows,), np.int32)
    valid = np.zeros((rows,), np.int32)
    lengths = np.zeros((rows,), np.int32)
    for r, (ids, rid) in enumerate(zip(prompts, request_ids)):
        n = len(ids)
        tokens[r, bucket - n:] = ids
        positions[r, bucket - n:] = np.arange(n)
        segments[r, bucket - n:] = 1
        row_ids[r], valid[r], lengths[r] = rid, 1, n
    return PromptBatch(tokens, positions, segments, row_ids, valid, lengths)


@dataclasses.dataclass
class PackedRows:
    inputs: np.ndarray     # [rows, length] int32
    targets: np.ndarray    # [rows, length] int32: the next token of each input position
    positions: np.ndarray  # [rows, length] int32, restarting at 0 in each segment
    segments: np.ndarray   # [rows, length] int32, 1.. per packed sequence, 0 = padding
    spans: list            # per pair: (row, first, last): its continuation's target columns


def pack_pairs(pairs: list[tuple[list[int], list[int]]], row_len: int) -> PackedRows:
    """(context, continuation) pairs, each as one packed segment (first-fit, longest first).

    A sequence is context + continuation; it is fed without its last token and scored on the
    continuation's targets. Callers make every sequence fit (at most row_len + 1 tokens).
    """
    lengths = [len(c) + len(x) - 1 for c, x in pairs]
    order = sorted(range(len(pairs)), key=lambda i: (-lengths[i], i))
    fill: list[int] = []
    placed: dict[int, tuple[int, int]] = {}
    for i in order:
        row = next((r for r, used in enumerate(fill) if used + lengths[i] <= row_len), None)
        if row is None:
            row = len(fill)
            fill.append(0)
        placed[i] = (row, fill[row])
        fill[row] += lengths[i]
    shape = (len(fill), row_len)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    seg_count = [0] * len(fill)
    spans = []
    for i, (context, continuation) in enumerate(pairs):
        row, start = placed[i]
        seq = list(context) + list(continuation)
        n = lengths[i]
        seg_count[row] += 1
        inputs[row, start:start + n] = seq[:-1]
        targets[row, start:start + n] = seq[1:]
        positions[row, start:start + n] = np.arange(n)
        segments[row, start:start + n] = seg_count[row]
        spans.append((row, start + len(context) - 1, start + n))
    return PackedRows(inputs, targets, positions, segments, spans)
