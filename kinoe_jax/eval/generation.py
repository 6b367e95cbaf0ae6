"""Running a dump's samples through the engine: prompts as token ids (plain, or through the chat
template as llm-jp-eval-inference does with --apply_chat_template), greedy answers, and the
log-likelihood choice of multiple-choice samples."""

from __future__ import annotations

import numpy as np

from kinoe_jax.data.chat.conversation import prompt_ids as chat_prompt_ids
from kinoe_jax.data.vocab import BOS_ID
from kinoe_jax.eval.dumps import max_new_tokens


def prompt_ids(sample: dict, vocab, chat_template: bool) -> list[int]:
    """BOS + the prompt; with the chat template: system (if any) + user, then the assistant header."""
    if not chat_template:
        return [BOS_ID] + list(vocab.encode(sample["prompt"]))
    messages = [{"role": "system", "content": sample["system_prompt"]}] if sample.get("system_prompt") else []
    return chat_prompt_ids(messages + [{"role": "user", "content": sample["prompt"]}], vocab)


def generate_dataset(engine, dump: dict, chat_template: bool = False, samples=None, max_new_cap: int | None = None):
    """Greedy completions of the dump's samples (all, or the given ones), in order."""
    samples = dump["samples"] if samples is None else samples
    n = max_new_tokens(dump) if max_new_cap is None else min(max_new_tokens(dump), max_new_cap)
    ids = [prompt_ids(s, engine.vocab, chat_template) for s in samples]
    return ids, engine.generate(ids, n)


def choice_accuracy(engine, samples: list[dict], chat_template: bool = False) -> float | None:
    """Accuracy of picking, among each sample's "choices", the one of highest log-likelihood
    after the prompt (None when no sample has choices)."""
    picked = [s for s in samples if "choices" in s]
    if not picked:
        return None
    pairs, owners = [], []
    for i, s in enumerate(picked):
        context = prompt_ids(s, engine.vocab, chat_template)
        for choice in s["choices"]:
            pairs.append((context, list(engine.vocab.encode(choice))))
            owners.append(i)
    scores = engine.loglikelihood(pairs)
    best: dict[int, tuple[float, int]] = {}
    for k, (i, score) in enumerate(zip(owners, scores)):
        j = k - owners.index(i)
        if i not in best or score.logprob > best[i][0]:
            best[i] = (score.logprob, j)
    hits = [picked[i]["choices"][j] == picked[i]["gold"] for i, (_, j) in sorted(best.items())]
    return float(np.mean(hits))
