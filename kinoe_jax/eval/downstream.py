"""Downstream scores while training: llm-jp-eval style datasets on the live, sharded parameters.

The training loop calls `downstream_eval(model_cfg, params, mesh)` every
`train.downstream_eval_every` steps, on every process. Each dataset is a prompt dump (the
built-in set by default); its first `max_samples` samples are answered greedily and scored with
the dump's metrics, and samples that carry "choices" are also answered by log-likelihood (the
choice the model finds most probable after the prompt). Returns
    downstream/<dataset>/<metric>       e.g. downstream/kinoe_arith/exact_match_figure
    downstream/<dataset>/choice_accuracy
    downstream/average                  the mean of all of the above
Compiled programs are shared between calls, so only the first evaluation of a run compiles.
"""

from __future__ import annotations

import logging
import time

import gin
import numpy as np

from kinoe_jax.eval import dumps as dumps_lib
from kinoe_jax.eval import metrics as metrics_lib
from kinoe_jax.eval.generation import choice_accuracy, generate_dataset
from kinoe_jax.inference import Engine

log = logging.getLogger(__name__)
PREFIX = "downstream"


@gin.configurable
def downstream_eval(model_cfg, params, mesh=None, datasets=("builtin",), max_samples: int = 16,
                    max_new_tokens: int = 32, batch_size: int = 16, chat_template: bool = False,
                    vocab=None) -> dict[str, float]:
    """datasets: built-in names, globs of *.eval-prompt.json, or "builtin" for the whole built-in
    set. chat_template: wrap prompts in the chat template (for SFT/DPO models)."""
    t0 = time.perf_counter()
    names = [d for d in datasets if d != "builtin"] + (dumps_lib.builtin_names() if "builtin" in datasets else [])
    engine = Engine(model_cfg, params, mesh, vocab=vocab, batch_size=batch_size)
    out: dict[str, float] = {}
    for _, dump in dumps_lib.resolve(names):
        name, samples = dump["target_dataset"], dump["samples"][:max_samples]
        _, completions = generate_dataset(engine, dump, chat_template, samples, max_new_cap=max_new_tokens)
        scores, _, _ = metrics_lib.score_dataset([c.text for c in completions], [s["gold"] for s in samples],
                                                 dump["metrics"])
        out.update({f"{PREFIX}/{name}/{m}": v for m, v in scores.items()})
        accuracy = choice_accuracy(engine, samples, chat_template)
        if accuracy is not None:
            out[f"{PREFIX}/{name}/choice_accuracy"] = accuracy
    if out:
        out[f"{PREFIX}/average"] = float(np.mean(list(out.values())))
    log.info("downstream evaluation in %.1f s (%d programs compiled, %.1f s)", time.perf_counter() - t0,
             engine.stats["compiles"], engine.stats["compile_seconds"])
    return out
