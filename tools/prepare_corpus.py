"""Clean a Japanese pretraining corpus: normalise, filter, deduplicate.

    python tools/prepare_corpus.py --input='data/raw/*.jsonl.gz' --output_dir=data/clean
        [--config=FILE] [--text_field=text] [--num_workers=N] [--shard_size=N]
        [--overwrite] [--runner=local|beam] [Beam pipeline options...]

Writes DIR/shard-XXXXX-of-NNNNN.jsonl.gz and DIR/report.json, and prints a
summary. Settings and their reasons: kinoe_jax/corpus/default_config.yaml.
"""

import sys
from pathlib import Path

try:
    from kinoe_jax.corpus.cli import main
except ModuleNotFoundError:
    # Running from a source checkout without the package installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kinoe_jax.corpus.cli import main

if __name__ == "__main__":
    sys.exit(main())
