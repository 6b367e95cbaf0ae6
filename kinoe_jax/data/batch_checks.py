"""The first batch of a run is checked before the expensive first compile, naming what is wrong."""

from __future__ import annotations

import numpy as np

from kinoe_jax.utils.errors import DataError


def check_batch(batch: dict, *, vocab_size: int, batch_size: int, seq_len: int, max_seq_len: int | None = None,
                features=("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                          "decoder_segment_ids", "decoder_positions")) -> None:
    """The first batch: features present, shapes, integer ids within the vocabulary, some loss weight."""
    p = []
    missing = [k for k in features if k not in batch]
    if missing:
        raise DataError(f"first batch: missing features {missing} (has {sorted(batch)}); is the feature "
                        "converter right for this task?")
    for key in features:
        a = np.asarray(batch[key])
        if a.shape != (batch_size, seq_len):
            p.append(f"{key} has shape {a.shape}, expected (local batch {batch_size}, DataConfig.seq_len {seq_len})")
            continue
        if key != "decoder_loss_weights" and not np.issubdtype(a.dtype, np.integer):
            p.append(f"{key} has dtype {a.dtype}, expected integers")
            continue
        if key in ("decoder_input_tokens", "decoder_target_tokens") and a.size:
            bad = np.argwhere((a < 0) | (a >= vocab_size))
            if len(bad):
                r, c = bad[0]
                p.append(f"{key}[{r}, {c}] = {a[r, c]} is outside the vocabulary [0, {vocab_size}) "
                         f"({len(bad)} such ids; ModelConfig.vocab_size too small for the tokenizer?)")
        if key == "decoder_positions" and max_seq_len is not None and a.size and a.max() >= max_seq_len:
            p.append(f"{key} reaches {a.max()} >= ModelConfig.max_seq_len {max_seq_len}")
        if key in ("decoder_segment_ids", "decoder_positions", "decoder_loss_weights") and a.size and a.min() < 0:
            p.append(f"{key} has negative values (min {a.min()})")
    w = np.asarray(batch["decoder_loss_weights"])
    if not p and not np.any(w > 0):
        p.append("decoder_loss_weights are all zero: nothing to learn from (empty examples, or an SFT mask "
                 "that hides every target?)")
    if p:
        raise DataError("first batch is unusable:\n  - " + "\n  - ".join(p))
