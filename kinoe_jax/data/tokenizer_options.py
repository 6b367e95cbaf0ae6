"""SentencePiece training options for Japanese, each with the reason it is set.

tools/train_tokenizer.py uses these; docs/tokenizer.md renders the same table (a test keeps them in step).
"""

from kinoe_jax.data.vocab import BOS_ID, CHAT_SYMBOLS, EOS_ID, PAD_ID, UNK_ID

# (option, value, reason)
OPTIONS = (
    ("model_type", "unigram",
     "Unigram LM segments Japanese (no spaces between words) better than BPE merges and gives "
     "sampling-friendly probabilities."),
    ("normalization_rule_name", "nmt_nfkc",
     "NFKC folds full-width ASCII and half-width katakana into one form, so ＡＢＣ/ABC and ｶﾀｶﾅ/カタカナ "
     "share pieces; nmt_ adds control-character clean-up."),
    ("byte_fallback", True,
     "Rare kanji and emoji outside the vocabulary become UTF-8 byte pieces instead of <unk>: "
     "nothing is lost and decode is exact."),
    ("split_digits", True,
     "Each digit is its own piece, so numbers are modelled digit by digit (better arithmetic, "
     "no arbitrary number pieces)."),
    ("add_dummy_prefix", False,
     "The default adds a '▁' before every text, which is a spurious token in Japanese where "
     "there are no word-separating spaces."),
    ("remove_extra_whitespaces", False,
     "Keep whitespace exactly as written (indentation in code, spaces in mixed Latin text)."),
    ("allow_whitespace_only_pieces", True,
     "Runs of spaces become single pieces instead of many '▁' tokens (code, tables)."),
    ("max_sentencepiece_length", 16,
     "Long enough for common Japanese compounds, short enough to avoid memorising whole phrases."),
    ("character_coverage", 0.9995,
     "Cover almost every kanji seen; the rarest 0.05% go through byte fallback."),
    ("user_defined_symbols", ["\n", "。", "、", *CHAT_SYMBOLS],
     "Newline and the Japanese full stop and comma are always single pieces (sentence and line "
     "structure stay visible); the chat-template control pieces are never split."),
    ("pad_id", PAD_ID, "seqio pads with 0."),
    ("eos_id", EOS_ID, "End of document / end of turn for generation."),
    ("unk_id", UNK_ID, "Kept for completeness; byte fallback makes it almost unused."),
    ("bos_id", BOS_ID, "Start of each packed segment (the decoder input is shifted right with it)."),
    ("input_sentence_size", 2_000_000, "Sample at most this many sentences: enough for a good vocabulary."),
    ("shuffle_input_sentence", True, "Sample uniformly rather than the head of the corpus."),
    ("train_extremely_large_corpus", False, "Only needed for very large samples."),
)


def spm_kwargs() -> dict:
    return {name: value for name, value, _ in OPTIONS}
