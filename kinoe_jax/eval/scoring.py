"""Offline scores of a run's generations: scores.json and the per-sample rows of the W&B table."""

from __future__ import annotations

import json
import os

import numpy as np
import wandb

from kinoe_jax.eval import metrics as metrics_lib


def score_results(results: list[tuple[str, dict]]) -> tuple[dict, list[dict]]:
    """(scores.json content, one row per sample) from (path, generated dump) pairs.

    A dataset's average is the mean of its computed metrics; "average" is the mean over
    datasets. Metrics that cannot be computed here are listed under "skipped" with the reason.
    """
    datasets, averages, skipped, counts, rows = {}, {}, {}, {}, []
    for _, dump in results:
        name, samples = dump["target_dataset"], dump["samples"]
        scores, per_sample, skip = metrics_lib.score_dataset([s["generated"] for s in samples],
                                                            [s["gold"] for s in samples], dump["metrics"])
        datasets[name] = scores
        counts[name] = len(samples)
        if scores:
            averages[name] = float(np.mean(list(scores.values())))
        if skip:
            skipped[name] = {m: metrics_lib.SKIPPED[m] for m in skip}
        for i, (s, sample_scores) in enumerate(zip(samples, per_sample)):
            rows.append({"dataset": name, "index": i, "prompt": s["prompt"], "gold": s["gold"],
                         "generated": s["generated"],
                         "score": float(np.mean(list(sample_scores.values()))) if sample_scores else None,
                         "scores": sample_scores})
    out = {"datasets": datasets, "dataset_average": averages,
           "average": float(np.mean(list(averages.values()))) if averages else None,
           "skipped": skipped, "num_samples": counts}
    return out, rows


TABLE_COLUMNS = ["dataset", "index", "prompt", "gold", "generated", "score", "scores"]


def log_to_wandb(run_dir: str, run_name: str, scores: dict, rows: list[dict], project: str = "kinoe_jax",
                 mode: str | None = None) -> str | None:
    """A W&B run (offline unless WANDB_MODE or `mode` says otherwise) holding the scores and a
    table of samples: prompt, gold, generated and score. Returns the run's directory."""
    mode = mode or os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    run = wandb.init(project=project, name=run_name, dir=run_dir, mode=mode, job_type="evaluation",
                     config={"scores": scores})
    table = wandb.Table(columns=TABLE_COLUMNS)
    for r in rows:
        table.add_data(*[json.dumps(r[c], ensure_ascii=False) if c == "scores" else r[c] for c in TABLE_COLUMNS])
    flat = {f"llm_jp_eval/{d}/{m}": v for d, ms in scores["datasets"].items() for m, v in ms.items()}
    if scores["average"] is not None:
        flat["llm_jp_eval/average"] = scores["average"]
    run.log({**flat, "llm_jp_eval/samples": table})
    directory = run.dir
    run.finish()
    return directory
