"""llm-jp-eval's scoring, as the Nejumi leaderboard's copy defines it.

Before scoring, a generation keeps its first paragraph, is stripped of whitespace and quotes,
and is NFKC-normalised; the gold answer is NFKC-normalised and stripped. Per-sample metrics are
averaged over a dataset; pearson and spearman are computed over the whole dataset.

Metrics this module cannot compute here (a neural scorer, code execution, ...) are named in
SKIPPED and reported as skipped; a name in neither table is an error.
"""

from __future__ import annotations

import functools
import math
import unicodedata

import numpy as np
from rapidfuzz import fuzz
from sacrebleu.metrics import BLEU

QUOTES = "\"'"


def normalize_prediction(text: str) -> str:
    return unicodedata.normalize("NFKC", text.split("\n\n")[0].strip().strip(QUOTES))


def normalize_gold(text: str) -> str:
    return unicodedata.normalize("NFKC", text.strip())


def exact_match(pred: str, gold: str) -> float:
    return float(pred == gold)


def exact_match_figure(pred: str, gold: str) -> float:
    try:
        return float(float(pred) == float(gold))
    except ValueError:
        return 0.0


def char_f1(pred: str, gold: str) -> float:
    return fuzz.token_sort_ratio(pred, gold) / 100.0


def set_f1(pred: str, gold: str) -> float:
    """F1 between the sets of stripped lines (an empty line counts as an item, as upstream)."""
    predicted = {x.strip() for x in pred.split("\n")}
    expected = {x.strip() for x in gold.split("\n")}
    hits = len(predicted & expected)
    if not hits:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(expected)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=None)
def _bleu(lang: str):
    # trg_lang="ja" tokenizes with MeCab (sacrebleu[ja]: mecab-python3 + ipadic).
    return BLEU(effective_order=True, trg_lang=lang)


def _bleu_score(pred: str, gold: str, lang: str) -> float:
    if not gold.strip():
        raise ValueError("bleu: the gold answer is empty")
    if not pred.strip():
        return 0.0
    return _bleu(lang).corpus_score([pred.strip()], [[gold.strip()]]).score / 100.0


def bleu_ja(pred: str, gold: str) -> float:
    return _bleu_score(pred, gold, "ja")


def bleu_en(pred: str, gold: str) -> float:
    return _bleu_score(pred, gold, "en")


def _parse_float(text: str) -> float:
    """As upstream: keep digits and dots; -2 when nothing numeric is left."""
    kept = "".join(c for c in text if c.isdigit() or c == ".")
    try:
        return float(kept)
    except ValueError:
        return -2.0


def _correlation(preds, golds, rank: bool) -> float:
    x = np.asarray([_parse_float(p) for p in preds], np.float64)
    y = np.asarray([float(g) for g in golds], np.float64)
    if rank:
        x, y = _ranks(x), _ranks(y)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    r = float(np.corrcoef(x, y)[0, 1])
    return 0.0 if math.isnan(r) else r


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman needs."""
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a), np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    for value in np.unique(a):
        tied = a == value
        ranks[tied] = ranks[tied].mean()
    return ranks


PER_SAMPLE = {"exact_match": exact_match, "exact_match_figure": exact_match_figure, "char_f1": char_f1,
              "set_f1": set_f1, "bleu_ja": bleu_ja, "bleu_en": bleu_en}
PER_DATASET = {"pearson": lambda p, g: _correlation(p, g, rank=False),
               "spearman": lambda p, g: _correlation(p, g, rank=True)}
SKIPPED = {
    "comet_wmt22": "needs the COMET neural model",
    "bert_score_ja_f1": "needs a BERT model", "bert_score_en_f1": "needs a BERT model",
    "code_exec": "runs generated code", "code_exec_sandbox": "runs generated code in a sandbox",
    "pylint_check": "needs pylint on generated code",
    "rouge1": "needs a Japanese ROUGE tokenizer", "rouge2": "needs a Japanese ROUGE tokenizer",
    "rougeLsum": "needs a Japanese ROUGE tokenizer", "rouge2_scaling": "needs a Japanese ROUGE tokenizer",
    "mathematical_equivalence": "needs a symbolic math checker",
    "polymath_weighted_accuracy": "needs its difficulty weights",
    "drop_f1": "needs DROP's answer normaliser", "triviaqa_f1": "needs TriviaQA's answer normaliser",
    "triviaqa_exact_match": "needs TriviaQA's answer normaliser",
    "hle_exact_match": "needs HLE's answer extraction",
    "contains_answer": "needs the dataset's answer aliases",
}
KNOWN = set(PER_SAMPLE) | set(PER_DATASET) | set(SKIPPED)


def sample_scores(pred: str, gold: str, metrics) -> dict[str, float]:
    """Per-sample scores of one (normalised) prediction, for the metrics that have them."""
    return {m: PER_SAMPLE[m](pred, gold) for m in metrics if m in PER_SAMPLE}


def score_dataset(predictions: list[str], golds: list[str], metrics) -> tuple[dict[str, float], list[dict], list[str]]:
    """(dataset scores, per-sample scores, skipped metric names). Inputs are raw text."""
    preds = [normalize_prediction(p) for p in predictions]
    refs = [normalize_gold(g) for g in golds]
    per_sample = [sample_scores(p, g, metrics) for p, g in zip(preds, refs)]
    scores = {}
    for m in metrics:
        if m in PER_SAMPLE:
            scores[m] = float(np.mean([s[m] for s in per_sample])) if per_sample else 0.0
        elif m in PER_DATASET:
            scores[m] = PER_DATASET[m](preds, refs)
    return scores, per_sample, [m for m in metrics if m in SKIPPED]
