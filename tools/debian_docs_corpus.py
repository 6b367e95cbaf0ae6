"""Turn the installed Debian Japanese documentation into corpus JSONL (one document a line: id,
package, text), for the filter benchmark and the ja_docs run.

    apt-get install -y manpages-ja gimp-help-ja debian-reference-ja
    python tools/debian_docs_corpus.py --output_dir=data/debian_docs [--clean]

Writes DIR/raw/train.jsonl and DIR/raw/validation.jsonl (a fixed 1 in 20 of the documents, chosen
by their id, held out); with --clean also DIR/clean/train/ and DIR/clean/validation/, each split
cleaned by tools/prepare_corpus.py with its default settings. Reads only what is installed on
this machine; nothing of Debian's text ships with the project. A missing package is named in one
line (exit status 2) and nothing is written.
"""

import argparse
import sys
import zlib
from collections import Counter
from pathlib import Path

try:
    import kinoe_jax  # noqa: F401
except ModuleNotFoundError:
    # Running from a source checkout without the package installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kinoe_jax.config import inputs as cli  # noqa: E402
from kinoe_jax.corpus import debian_docs  # noqa: E402
from kinoe_jax.utils.atomic import atomic_file  # noqa: E402

SPLITS = ("train", "validation")
HELD_OUT_ONE_IN = 20


def split_of(doc_id: str) -> str:
    # A hash of the id, not the position: the split stays the same when a package adds pages.
    return "validation" if zlib.crc32(doc_id.encode("utf-8")) % HELD_OUT_ONE_IN == 0 else "train"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="debian_docs_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where raw/ (and clean/) are written")
    parser.add_argument("--packages", nargs="+", choices=debian_docs.PACKAGES, default=list(debian_docs.PACKAGES),
                        help="which of the packages to read (default: all three)")
    parser.add_argument("--clean", action="store_true", help="also clean each split with prepare_corpus")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier clean/ output")
    args = parser.parse_args(argv)
    counts, chars = Counter(), Counter()
    with cli.reported(parser):
        packages = tuple(args.packages)
        debian_docs.require(packages)  # before anything is created
        raw = Path(args.output_dir) / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        with atomic_file(raw / "train.jsonl") as train, atomic_file(raw / "validation.jsonl") as validation:
            out = {"train": train, "validation": validation}
            for doc in debian_docs.documents(packages):
                split = split_of(doc.id)
                out[split].write(doc.to_json() + "\n")
                counts[doc.package, split] += 1
                chars[doc.package] += len(doc.text)
    for package in packages:
        print(f"{package}: {counts[package, 'train']} + {counts[package, 'validation']} held out documents, "
              f"{chars[package]:,} characters")
    print(f"wrote {raw}/train.jsonl and {raw}/validation.jsonl")
    if not args.clean:
        return 0
    from kinoe_jax.corpus.cli import main as prepare_corpus

    for split in SPLITS:
        flags = [f"--input={raw / split}.jsonl", f"--output_dir={Path(args.output_dir) / 'clean' / split}",
                 "--no_progress"] + (["--overwrite"] if args.overwrite else [])
        print(f"\nprepare_corpus {' '.join(flags)}")
        code = prepare_corpus(flags)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
