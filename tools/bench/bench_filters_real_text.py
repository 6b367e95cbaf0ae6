"""Precision and recall of each corpus filter on real Japanese text, against hand labels.

    python tools/debian_docs_corpus.py --output_dir=data/debian_docs
    python tools/bench/bench_filters_real_text.py --corpus=data/debian_docs/raw [--config=FILE] [--check]
    python tools/bench/bench_filters_real_text.py --smoke

Prints a Markdown table (for BENCHMARKS.md): per filter, alone, how many labelled documents it
removes, its precision and recall against the labels, and the share of each package it removes;
then the chain as configured (default: default_config.yaml) and the two goals: keep at least 98%
of the documents labelled "keep", remove at least 90% of those labelled "drop".

--smoke needs no Debian documentation: the same evaluation on a few built-in training texts
labelled keep and a few pages written to be dropped, in seconds.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

try:
    import kinoe_jax  # noqa: F401
except ModuleNotFoundError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kinoe_jax.config import inputs as cli  # noqa: E402
from kinoe_jax.corpus.config import ConfigError, load_config  # noqa: E402
from kinoe_jax.corpus.debian_docs import PACKAGES  # noqa: E402
from kinoe_jax.corpus.filter_eval import evaluate, markdown  # noqa: E402
from kinoe_jax.corpus.labels import DEBIAN_DOCS_LABELS, check_ids, load_labels  # noqa: E402

RESULT_LINE = r"^labelled: \d+ keep, \d+ drop; the chain keeps "


def read_corpus(path: str) -> list[tuple[str, str, str]]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                docs.append((record["id"], record.get("package", ""), record["text"]))
            except (ValueError, KeyError, TypeError) as e:
                raise cli.InputError(f"--corpus: {path}:{number}: not a corpus record ({e})") from None
    return docs


def smoke_inputs(directory: str) -> tuple[str, str]:
    """(corpus, labels) for --smoke: built-in training texts labelled keep, and an English page and
    a one-line page labelled drop, each filed under one of the packages."""
    from kinoe_jax.data.vocab import BUILTIN_DIR  # here: it loads seqio and TensorFlow, which the real run needs not

    with open(Path(BUILTIN_DIR, "corpus", "train", "part_a.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()][:4]
    pages = [(text, "keep") for text in texts] + [
        ("This page is written in English only, as many pages of a web crawl are. " * 8, "drop\tnot_japanese"),
        ("短い。", "drop\ttoo_short")]
    corpus, labels = Path(directory, "corpus.jsonl"), Path(directory, "labels.tsv")
    with open(corpus, "w", encoding="utf-8") as c, open(labels, "w", encoding="utf-8") as lab:
        for i, (text, verdict) in enumerate(pages):
            package = PACKAGES[i % len(PACKAGES)]
            doc_id = f"{package}:smoke/{i}"
            c.write(json.dumps({"id": doc_id, "package": package, "text": text}, ensure_ascii=False) + "\n")
            lab.write(f"{doc_id}\t{verdict}\n")
    return str(corpus), str(labels)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_filters_real_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", metavar="GLOB",
                        help="JSONL from tools/debian_docs_corpus.py (a glob or directory; its raw/ files)")
    parser.add_argument("--labels", default=str(DEBIAN_DOCS_LABELS), help="labels file (id, keep|drop, reason)")
    parser.add_argument("--config", help="YAML overriding default_config.yaml, as for prepare_corpus")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the chain keeps --min_keep of the 'keep' documents and removes "
                             "--min_drop of the 'drop' ones (the real-text CI step)")
    parser.add_argument("--min_keep", type=float, default=0.98, help="goal: share of 'keep' documents kept")
    # The goal is 0.9; the defaults reach 0.70 (BENCHMARKS.md). The check guards what is
    # reached, so that a change that lets more tables and English pages through is noticed.
    parser.add_argument("--min_drop", type=float, default=0.65, help="floor: share of 'drop' documents removed")
    parser.add_argument("--smoke", action="store_true", help="built-in text instead of --corpus and --labels")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.corpus, args.labels = smoke_inputs(tmp)
            return evaluate_and_report(parser, args)
    if not args.corpus:
        parser.error("the following arguments are required: --corpus")
    return evaluate_and_report(parser, args)


def evaluate_and_report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    for flag in ("min_keep", "min_drop"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            parser.error(f"--{flag} must be in [0, 1], got {getattr(args, flag)}")
    with cli.reported(parser, ConfigError):
        cfg = load_config(args.config and cli.text_file("--config", args.config))
        labels = load_labels(cli.text_file("--labels", args.labels))
        docs = [doc for path in cli.text_files("--corpus", args.corpus, cli.JSONL, sniff=True)
                for doc in read_corpus(path)]
        check_ids(labels, (doc_id for doc_id, _, _ in docs), args.labels)
    start = time.perf_counter()
    result = evaluate(docs, labels, cfg)
    seconds = time.perf_counter() - start
    print(markdown(result, PACKAGES))
    print(f"\n{len(docs)} documents ({', '.join(f'{p} {result.docs_by_package[p]}' for p in PACKAGES)}); "
          f"config: {args.config or 'defaults'}; {seconds:.1f} s on {platform.machine()} "
          f"({platform.processor() or 'cpu'}), Python {platform.python_version()}")
    if args.check:
        keep = result.chain_kept_keep / result.labelled_keep
        drop = result.chain_removed_drop / result.labelled_drop
        if keep < args.min_keep or drop < args.min_drop:
            print(f"check failed: keeps {keep:.1%} of 'keep' (needs {args.min_keep:.0%}), removes {drop:.1%} "
                  f"of 'drop' (needs {args.min_drop:.0%})", file=sys.stderr)
            return 1
        print(f"check passed: keeps {keep:.1%} of 'keep', removes {drop:.1%} of 'drop'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
