"""Train the SentencePiece tokenizer on Japanese text and evaluate it on held-out text.

Regenerate the built-in model (committed at kinoe_jax/data/builtin/tokenizer/kinoe_ja.model):
    python tools/train_tokenizer.py
Train on your own corpus:
    python tools/train_tokenizer.py --input='data/*.jsonl.gz' --vocab_size=48000 --output=tok/ja48k
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import random
import shutil
import sys
import tempfile
import unicodedata

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kinoe_jax.data.tokenizer_options import OPTIONS, spm_kwargs  # noqa: E402
from kinoe_jax.data.vocab import BUILTIN_DIR  # noqa: E402

DEFAULT_TRAIN = os.path.join(BUILTIN_DIR, "corpus", "train", "*.jsonl")
DEFAULT_EVAL = os.path.join(BUILTIN_DIR, "corpus", "validation", "*.jsonl")
DEFAULT_OUTPUT = os.path.join(BUILTIN_DIR, "tokenizer", "kinoe_ja")


def iter_texts(pattern: str, text_field: str):
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"train_tokenizer: no file matches {pattern!r}")
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError) as e:
                    raise SystemExit(f"{path}:{lineno}: cannot read field {text_field!r}: {e}") from e
                yield text


def evaluate(model_path: str, texts: list[str]) -> dict:
    sp = spm.SentencePieceProcessor(model_file=model_path)
    byte_ids = {i for i in range(sp.get_piece_size()) if sp.is_byte(i)}
    chars = tokens = bytes_ = unks = 0
    exact = exact_norm = 0
    for text in texts:
        ids = sp.encode(text)
        chars += len(text)
        tokens += len(ids)
        bytes_ += sum(i in byte_ids for i in ids)
        unks += sum(i == sp.unk_id() for i in ids)
        decoded = sp.decode(ids)
        exact += decoded == text
        # nmt_nfkc folds e.g. full-width digits by design: compare against the normalised text too.
        exact_norm += decoded == unicodedata.normalize("NFKC", text)
    return {"documents": len(texts), "chars_per_token": chars / max(tokens, 1),
            "byte_fallback_rate": bytes_ / max(tokens, 1), "unk_rate": unks / max(tokens, 1),
            "exact_round_trip": exact / max(len(texts), 1),
            "round_trip_modulo_nfkc": exact_norm / max(len(texts), 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_TRAIN, help="JSONL(.gz) glob to train on")
    parser.add_argument("--eval_input", default=DEFAULT_EVAL, help="held-out JSONL(.gz) glob")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="output prefix (.model and .vocab)")
    parser.add_argument("--sample_docs", type=int, default=0, help="use at most N documents (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    texts = list(iter_texts(args.input, args.text_field))
    if args.sample_docs and len(texts) > args.sample_docs:
        texts = random.Random(args.seed).sample(texts, args.sample_docs)
    with tempfile.TemporaryDirectory() as tmp:
        sentences = os.path.join(tmp, "sentences.txt")
        with open(sentences, "w", encoding="utf-8") as f:
            for text in texts:
                # One training "sentence" per line; newlines inside documents stay as pieces.
                for line in text.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(input=sentences, model_prefix=prefix, vocab_size=args.vocab_size,
                                       num_threads=os.cpu_count() or 1,
                                       minloglevel=2, **spm_kwargs())
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        for ext in (".model", ".vocab"):  # atomic: rename into place
            tmp_out = args.output + ext + ".tmp"
            shutil.copyfile(prefix + ext, tmp_out)
            os.replace(tmp_out, args.output + ext)

    print(f"trained {args.output}.model on {len(texts)} documents, vocab {args.vocab_size}")
    for name, value, _ in OPTIONS:
        print(f"  {name} = {value!r}")
    held_out = list(iter_texts(args.eval_input, args.text_field))
    report = evaluate(args.output + ".model", held_out)
    print("held-out evaluation: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in report.items()))
    return report


if __name__ == "__main__":
    main()
