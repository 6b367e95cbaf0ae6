"""Near-duplicate recall of tools/prepare_corpus.py on a synthetic Jaccard sweep.

Goal: at least 99% of pairs with Jaccard >= 0.85 removed, at most 1% of pairs
with Jaccard <= 0.6 removed. Each pair is a random "document" and a copy with
some spans replaced; the Jaccard similarity of the two character 5-gram sets
is measured with the tool's own shingling, not assumed from the edit size.
Random characters make unrelated documents share no 5-grams, so every
removal is the pair's own doing.
"""

import dataclasses
import gzip
import json
import random

import pytest

from kinoe_jax.corpus import cli
from kinoe_jax.corpus.config import load_config
from kinoe_jax.corpus.dedup import candidate_probability, lsh_params, shingles

# Hiragana and common kanji; all of them are unchanged by NFKC.
ALPHABET = [chr(c) for c in range(0x3041, 0x3094)] + [chr(c) for c in range(0x4E00, 0x4E00 + 1500)]
# Aimed Jaccard values; the boundary ones sit just inside each goal's range.
HIGH = (0.853, 0.86, 0.88, 0.9, 0.94, 0.98)
LOW = (0.3, 0.45, 0.55, 0.58, 0.597)
PAIRS_PER_TARGET = 90

NO_FILTERS = """
pii: {mask: false}
filters:
  min_chars: null
  min_japanese_fraction: null
  min_hiragana_fraction: null
  max_top_ngram_share: null
  max_duplicate_line_share: null
  min_mean_sentence_chars: null
  max_mean_sentence_chars: null
  max_ad_keywords: null
  min_prose_chars: null
  max_bbs_markers_per_1000: null
  discrimination_content: false
"""


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a, 5), shingles(b, 5)
    return len(x & y) / len(x | y)


def edited_copy(rng: random.Random, text: str, target: float) -> str:
    """Replaces one to three spans, of about the total length that gives
    ``target``: spans of k characters in all, in p places, change about
    c = k + 4p of the M = L - 4 5-grams, and J = (M - c) / (M + c)."""
    pieces = rng.randint(1, 3)
    changed = (len(text) - 4) * (1 - target) / (1 + target)
    total = max(pieces, round(changed) - 4 * pieces)
    chars = list(text)
    for p in range(pieces):
        size = total // pieces + (total % pieces if p == 0 else 0)
        start = rng.randrange(len(text) - size)
        chars[start:start + size] = rng.choices(ALPHABET, k=size)
    return "".join(chars)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    rng = random.Random(15)
    root = tmp_path_factory.mktemp("sweep")
    pairs = []  # (pair index, measured Jaccard)
    with open(root / "sweep.jsonl", "w", encoding="utf-8") as f:
        for i, target in enumerate(t for t in HIGH + LOW for _ in range(PAIRS_PER_TARGET)):
            original = "".join(rng.choices(ALPHABET, k=rng.randint(300, 1500)))
            copy = edited_copy(rng, original, target)
            pairs.append((i, jaccard(original, copy)))
            for suffix, text in (("a", original), ("b", copy)):
                f.write(json.dumps({"id": f"{i}{suffix}", "text": text}, ensure_ascii=False) + "\n")
    (root / "no_filters.yaml").write_text(NO_FILTERS, encoding="utf-8")
    return root, pairs


def run_tool(root, name: str, extra_config: str = "", runner: str = "local") -> tuple[set[str], dict]:
    """Ids of the documents kept, and the report."""
    config = root / f"{name}.yaml"
    config.write_text(NO_FILTERS + extra_config, encoding="utf-8")
    out = root / name
    assert cli.main([f"--input={root / 'sweep.jsonl'}", f"--output_dir={out}", f"--config={config}",
                     f"--runner={runner}", "--num_workers=1", "--no_progress"]) == 0
    kept = set()
    for shard in out.glob("shard-*.jsonl.gz"):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            kept.update(json.loads(line)["id"] for line in f)
    return kept, json.loads((out / "report.json").read_text(encoding="utf-8"))


def removal_rates(pairs, kept: set[str]) -> tuple[float, float]:
    """Shares of copies removed among pairs at Jaccard >= 0.85 and <= 0.6."""
    assert all(f"{i}a" in kept for i, _ in pairs), "an original was removed"
    high = [f"{i}b" not in kept for i, j in pairs if j >= 0.85]
    low = [f"{i}b" not in kept for i, j in pairs if j <= 0.6]
    return sum(high) / len(high), sum(low) / len(low)


@pytest.fixture(scope="module")
def default_run(sweep):
    root, _ = sweep
    return run_tool(root, "default")


def test_sweep_covers_both_boundaries(sweep):
    _, pairs = sweep
    js = [j for _, j in pairs]
    high = [j for j in js if j >= 0.85]
    low = [j for j in js if j <= 0.6]
    assert len(high) >= 500 and len(low) >= 350
    # Enough pairs right at each boundary, where misses and false removals live.
    assert sum(j < 0.87 for j in high) >= 100
    assert sum(j > 0.58 for j in low) >= 100


def test_default_config_meets_the_recall_goal(sweep, default_run):
    _, pairs = sweep
    kept, report = default_run
    high, low = removal_rates(pairs, kept)
    assert high >= 0.99, f"only {high:.1%} of pairs at Jaccard >= 0.85 removed"
    assert low <= 0.01, f"{low:.1%} of pairs at Jaccard <= 0.6 removed"
    assert report["removed"] == {"exact_duplicate": 0, "near_duplicate": len(pairs) * 2 - len(kept)}


def test_sweep_catches_equal_weight_banding(sweep):
    # datasketch's own bands for threshold 0.8 (9 x 13): the setting that
    # kept both copies of 3 in 10 planted pairs. The sweep must see it.
    root, pairs = sweep
    kept, report = run_tool(root, "equal_weight", "dedup: {threshold: 0.8, rows_per_band: 13}\n")
    assert report["lsh"] == {"bands": 9, "rows_per_band": 13}
    high, _ = removal_rates(pairs, kept)
    assert high < 0.95


def test_beam_runner_removes_the_same_copies(sweep, default_run):
    root, _ = sweep
    kept, report = run_tool(root, "beam", runner="beam")
    assert kept == default_run[0]
    assert report["lsh"] == default_run[1]["lsh"]


def test_bands_are_derived_from_the_threshold():
    cfg = load_config().dedup
    assert lsh_params(cfg) == (18, 7)
    for threshold in (0.6, 0.7, 0.75, 0.8, 0.9):
        c = dataclasses.replace(cfg, threshold=threshold)
        bands, rows = lsh_params(c)
        assert bands == c.num_perm // rows
        # The most rows that still reach the recall at the threshold itself.
        assert candidate_probability(threshold, bands, rows) >= c.candidate_recall
        assert candidate_probability(threshold, c.num_perm // (rows + 1), rows + 1) < c.candidate_recall
    assert lsh_params(dataclasses.replace(cfg, rows_per_band=8)) == (16, 8)
