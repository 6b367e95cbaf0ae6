"""The tokenizer: the built-in SentencePiece model and the ids the whole stack agrees on."""

from __future__ import annotations

import functools
import os

import gin
import seqio

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "builtin")
BUILTIN_TOKENIZER = os.path.join(BUILTIN_DIR, "tokenizer", "kinoe_ja.model")

# Fixed ids, set when the tokenizer is trained (tools/train_tokenizer.py): seqio pads with 0.
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
# Control pieces reserved for the chat template (kinoe_jax/data/chat/template.py uses them).
CHAT_SYMBOLS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


@gin.configurable
def tokenizer_path(path: str | None = None) -> str:
    path = path or BUILTIN_TOKENIZER
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer model {path} not found; regenerate the built-in one with "
            "`python tools/train_tokenizer.py`")
    return path


@functools.lru_cache(maxsize=None)
def _vocab(path: str) -> seqio.SentencePieceVocabulary:
    return seqio.SentencePieceVocabulary(path)


def get_vocabulary() -> seqio.SentencePieceVocabulary:
    return _vocab(tokenizer_path())
