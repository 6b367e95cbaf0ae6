"""Check SFT, preference and MT-Bench question files before training or evaluating with them.

    python tools/validate_sft.py                                  # the built-in sets
    python tools/validate_sft.py data/sft/*.jsonl --seq_len=2048 --json=report.json

Per file: JSON schema and chat role order, unique ids, token lengths against --seq_len (with the
chat template and the configured tokenizer); senryu: the mora count of every line with MeCab +
UniDic (fugashi, unidic-lite), 5-7-5 unless marked jiamari, deliberate jiamari listed; over all
files: the near-duplicate rate inside each set and between sets (the corpus tool's MinHash).
Exit status 0 when everything passes, 1 otherwise.
"""

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import kinoe_jax  # noqa: F401
except ModuleNotFoundError:
    # Running from a source checkout without the package installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUILTIN = Path(__file__).resolve().parents[1] / "kinoe_jax" / "data" / "builtin" / "sft"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="JSONL files, glob patterns or directories of JSONL files "
                        "(default: the built-in sets)")
    parser.add_argument("--seq_len", type=int, default=512,
                        help="the training sequence length (DataConfig.seq_len / dpo.seq_len); an example "
                             "fits when its ids, BOS aside, are at most this many")
    parser.add_argument("--near_dup_threshold", type=float, default=None,
                        help="MinHash Jaccard at or above which two items are near duplicates "
                             "(default: the corpus tool's setting)")
    parser.add_argument("--max_near_dup_rate", type=float, default=0.0,
                        help="largest allowed share of a set's items that repeat an item of the same or "
                             "an earlier set")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the built-in one)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    args = parser.parse_args(argv)

    from kinoe_jax.config import inputs as cli

    paths = []
    with cli.reported(parser):  # before the tokenizer and TensorFlow load
        # A file that is wholly another encoding is refused here; a stray bad line is reported per line.
        for pattern in args.files or [str(BUILTIN)]:
            paths += [p for p in cli.text_files(None, pattern, cli.JSONL, sniff=True) if p not in paths]
        if args.tokenizer:
            cli.data_file("--tokenizer", args.tokenizer)

    from kinoe_jax.data import vocab as vocab_lib
    from kinoe_jax.sft.validate import validate

    if args.tokenizer:
        import gin

        gin.bind_parameter("tokenizer_path.path", args.tokenizer)
    result = validate(paths, vocab_lib.get_vocabulary(), args.seq_len, args.near_dup_threshold,
                      args.max_near_dup_rate, progress=True)
    print(result.text())
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, ensure_ascii=False, indent=1)
        os.replace(tmp, args.json)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
