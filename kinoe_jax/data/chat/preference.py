"""Preference pairs for DPO: a prompt (messages ending with a user turn), a chosen and a rejected
assistant reply, each rendered with the chat template into a padded row with its loss mask."""

from __future__ import annotations

import dataclasses

import numpy as np

from kinoe_jax.data.vocab import BOS_ID
from kinoe_jax.data.chat.conversation import BadExample, check_length, check_messages, encode, parse_line
from kinoe_jax.data.chat.report import Report, scan

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def encode_pair(line: str, vocab) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """One preference line -> ((chosen ids, weights), (rejected ids, weights)), without BOS."""
    obj = parse_line(line, key="prompt")
    prompt = check_messages(obj["prompt"], final_assistant=False)
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if not (isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() and rejected.strip()):
        raise BadExample("bad_pair", f"chosen {type(chosen).__name__}, rejected {type(rejected).__name__}")
    if chosen == rejected:
        raise BadExample("bad_pair", "chosen and rejected are identical")
    out = []
    for reply in (chosen, rejected):
        messages = check_messages(prompt + [{"role": "assistant", "content": reply}])
        out.append(encode(messages, vocab))
    return out[0], out[1]


def to_row(ids: list[int], weights: list[int], seq_len: int) -> dict[str, np.ndarray]:
    """Teacher-forcing row: inputs are BOS + ids[:-1], targets are ids; zero padding after."""
    n = len(ids)
    row = {k: np.zeros((seq_len,), np.int32) for k in ROW_KEYS}
    row["inputs"][:n] = [BOS_ID] + ids[:-1]
    row["targets"][:n] = ids
    row["weights"][:n] = weights
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    return row


@dataclasses.dataclass
class PreferenceData:
    chosen: dict[str, np.ndarray]  # each [num_pairs, seq_len]
    rejected: dict[str, np.ndarray]
    sources: list[tuple[str, int]]  # file and line of each pair
    report: Report

    def __len__(self) -> int:
        return len(self.sources)

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """{"chosen_<key>", "rejected_<key>"} rows of the given pairs."""
        out = {f"chosen_{k}": v[index] for k, v in self.chosen.items()}
        out.update({f"rejected_{k}": v[index] for k, v in self.rejected.items()})
        return out


def load_pairs(patterns, seq_len: int, vocab, progress: bool = False) -> PreferenceData:
    """Every usable pair of the files; the rest is in .report with file:line."""

    def handle(line):
        (c_ids, c_w), (r_ids, r_w) = encode_pair(line, vocab)
        check_length(c_ids, c_w, seq_len)
        check_length(r_ids, r_w, seq_len)
        return to_row(c_ids, c_w, seq_len), to_row(r_ids, r_w, seq_len)

    rows, report = scan(patterns, handle, progress=progress)
    if not rows:
        stack = {k: np.zeros((0, seq_len), np.int32) for k in ROW_KEYS}
        return PreferenceData(stack, dict(stack), [], report)
    chosen = {k: np.stack([r[2][0][k] for r in rows]) for k in ROW_KEYS}
    rejected = {k: np.stack([r[2][1][k] for r in rows]) for k in ROW_KEYS}
    return PreferenceData(chosen, rejected, [(r[0], r[1]) for r in rows], report)
