r"""Train the SentencePiece tokenizer on Japanese text and evaluate it on held-out text.

Regenerate the built-in model (committed at kinoe_jax/data/builtin/tokenizer/kinoe_ja.model):
    python tools/train_tokenizer.py
Train on your own corpus (a uniform sample of N documents):
    python tools/train_tokenizer.py --input='data/*.jsonl.gz' --sample_docs=1000000 --vocab_size=48000 --output=tok/ja48k
or on a sample of any seqio task or mixture (registered by gin files, as training registers them):
    python tools/train_tokenizer.py --gin_file=gin_configs/data/ja_web.gin --task=ja_pretrain \
        --sample_docs=1000000 --eval_task=ja_pretrain --vocab_size=48000 --output=tok/ja48k
Every SentencePiece option and its reason: kinoe_jax/data/tokenizer_options.py (table in docs/tokenizer.md,
refreshed with --write_options_table=docs/tokenizer.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import unicodedata
import zlib

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kinoe_jax.config import inputs as cli  # noqa: E402


def _jsonl_files(flag: str, pattern: str) -> list[str]:
    return cli.text_files(flag, pattern, cli.JSONL, sniff=True)


INPUTS = {"--input": _jsonl_files, "--eval_input": _jsonl_files, "--compare": cli.data_file,
          "--gin_file": cli.gin_file, "--write_options_table": cli.text_file}
if __name__ == "__main__":  # a bad path is named before TensorFlow loads
    cli.precheck(INPUTS)

from kinoe_jax.data.tokenizer_options import OPTIONS, spm_kwargs  # noqa: E402
from kinoe_jax.data.vocab import BUILTIN_DIR  # noqa: E402

DEFAULT_TRAIN = os.path.join(BUILTIN_DIR, "corpus", "train", "*.jsonl")
DEFAULT_EVAL = os.path.join(BUILTIN_DIR, "corpus", "validation", "*.jsonl")
DEFAULT_OUTPUT = os.path.join(BUILTIN_DIR, "tokenizer", "kinoe_ja")
BUILTIN_MODEL = DEFAULT_OUTPUT + ".model"


def iter_texts(flag: str, files: list[str], text_field: str):
    """The `text_field` of every line of `files`; a line that is not UTF-8 JSON with it is an InputError."""
    for path in files:
        opener = gzip.open if path.endswith(".gz") else open
        lineno = 0
        try:
            with opener(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line.decode("utf-8"))[text_field]
                    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
                        raise cli.InputError(f"{flag}: {path}:{lineno}: cannot read field {text_field!r}: {e}") \
                            from None
                    yield text
        except (OSError, EOFError, zlib.error) as e:  # a cut or corrupt .gz
            raise cli.InputError(f"{flag}: {path}:{lineno + 1}: cannot be read ({e})") from None


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


def sample(texts, k: int, seed: int) -> list[str]:
    """A uniform sample of k texts from a stream of any length (reservoir), or all when k is 0."""
    if not k:
        return list(texts)
    rng, kept = random.Random(seed), []
    for i, text in enumerate(texts):
        if i < k:
            kept.append(text)
        elif (j := rng.randint(0, i)) < k:
            kept[j] = text
    return kept


def task_texts(name: str, split: str, limit: int, seed: int, gin_files, gin_bindings) -> list[str]:
    """Raw texts of a seqio task or mixture, registered the way training registers them."""
    from kinoe_jax.training import loop  # noqa: F401  (every configurable a run's gin files may bind)
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.data import sources

    load_gin(gin_files, gin_bindings)
    sources.register_data()
    return list(sources.task_texts(name, split, limit=limit or None, seed=seed))


def options_table() -> str:
    """The markdown table of OPTIONS (docs/tokenizer.md embeds it; a test keeps them equal)."""
    rows = ["| option | value | why |", "|---|---|---|"]
    for name, value, reason in OPTIONS:
        shown = repr(value).replace("|", "\\|")
        reason = reason.replace("|", "/").replace("<", "&lt;")  # markdown would take <unk> for HTML
        rows.append(f"| `{name}` | `{shown}` | {reason} |")
    return "\n".join(rows) + "\n"


TABLE_START, TABLE_END = "<!-- options table: start -->\n", "<!-- options table: end -->\n"


def write_options_table(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if TABLE_START not in doc or TABLE_END not in doc:
        raise cli.InputError(f"{path}: missing the markers {TABLE_START.strip()} / {TABLE_END.strip()}")
    head, rest = doc.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(head + TABLE_START + options_table() + TABLE_END + tail)
    os.replace(tmp, path)


def print_evaluation(reports: dict[str, dict]) -> None:
    names = list(reports)
    width = max(14, *(len(n) + 2 for n in names))
    print("held-out evaluation:")
    print(f"  {'metric':<24}" + "".join(f"{n:>{width}}" for n in names))
    for key in reports[names[0]]:
        cells = "".join(f"{r[key]:>{width}.4f}" if isinstance(r[key], float) else f"{r[key]:>{width}}"
                        for r in reports.values())
        print(f"  {key:<24}{cells}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_argument_group("training text (JSONL by default, or a seqio task/mixture)")
    src.add_argument("--input", default=DEFAULT_TRAIN, help="JSONL(.gz) glob or directory to train on")
    src.add_argument("--task", default=None,
                     help="seqio task or mixture to sample instead of --input (its text before tokenization)")
    src.add_argument("--split", default="train", help="split of --task")
    src.add_argument("--gin_file", action="append", default=[],
                     help="gin file registering the tasks (e.g. gin_configs/data/ja_web.gin); repeatable")
    src.add_argument("--gin_bindings", action="append", default=[], help="gin binding; repeatable")
    src.add_argument("--text_field", default="text", help="JSON field holding the text (JSONL input)")
    src.add_argument("--sample_docs", type=int, default=0,
                     help="train on a uniform sample of N documents (0: all of --input; --task needs N)")
    held = parser.add_argument_group("held-out evaluation")
    held.add_argument("--eval_input", default=DEFAULT_EVAL, help="held-out JSONL(.gz) glob or directory")
    held.add_argument("--eval_task", default=None, help="seqio task or mixture to evaluate on instead")
    held.add_argument("--eval_split", default="validation", help="split of --eval_task")
    held.add_argument("--eval_docs", type=int, default=2000, help="evaluate on at most N documents (0: all)")
    held.add_argument("--compare", default=BUILTIN_MODEL,
                      help="also evaluate this model on the same text ('' to skip); default: the built-in one")
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="output prefix (.model and .vocab)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write_options_table", metavar="MARKDOWN", default=None,
                        help="rewrite the options table in this markdown file (docs/tokenizer.md) and exit")
    args = parser.parse_args(argv)

    if args.write_options_table:
        with cli.reported(parser):
            write_options_table(cli.text_file("--write_options_table", args.write_options_table))
        print(f"wrote the options table into {args.write_options_table}")
        return None
    if args.task and not args.sample_docs:
        parser.error("--task needs --sample_docs N (a task or mixture may be endless)")
    cli.check_args(parser, args, INPUTS)
    with cli.reported(parser):  # every input is read before anything is written
        if args.task:
            texts = task_texts(args.task, args.split, args.sample_docs, args.seed, args.gin_file, args.gin_bindings)
        else:
            texts = sample(iter_texts("--input", _jsonl_files("--input", args.input), args.text_field),
                           args.sample_docs, args.seed)
        if not texts:
            raise cli.InputError(f"--task={args.task} (split {args.split}): no text" if args.task
                                 else f"--input={args.input}: no documents (only blank lines)")
        if args.eval_task:
            held_out = task_texts(args.eval_task, args.eval_split, args.eval_docs, args.seed, args.gin_file,
                                  args.gin_bindings)
        else:
            held_out = sample(iter_texts("--eval_input", _jsonl_files("--eval_input", args.eval_input),
                                         args.text_field), args.eval_docs, args.seed)
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

    source = f"task {args.task}:{args.split}" if args.task else args.input
    print(f"trained {args.output}.model on {len(texts)} documents of {source}, vocab {args.vocab_size}")
    for name, value, _ in OPTIONS:
        print(f"  {name} = {value!r}")
    reports = {"trained": evaluate(args.output + ".model", held_out)}
    if args.compare and os.path.abspath(args.compare) != os.path.abspath(args.output + ".model"):
        reports[os.path.basename(args.compare)] = evaluate(args.compare, held_out)
    print_evaluation(reports)
    return reports["trained"]

if __name__ == "__main__":
    main()
