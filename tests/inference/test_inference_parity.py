"""Parity after the tiny pretraining + SFT run: for 20 prompts of mixed lengths, the batched
engine's greedy tokens equal the single-prompt path's and transformers' `generate` on the HF
export, and its log-likelihoods match transformers' within 1e-4."""

import json
import os

import numpy as np
import pytest

from reference_runs import sft_runs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 16


def _prompts(vocab) -> list[list[int]]:
    """20 prompts of 2 to 44 tokens: the built-in evaluation prompts, cut to spread lengths."""
    from kinoe_jax.data.vocab import BOS_ID
    from kinoe_jax.eval.dumps import BUILTIN, load_dumps

    texts = [s["prompt"] for _, d in load_dumps(BUILTIN) for s in d["samples"][:3]]
    lengths = np.linspace(1, 43, 20).astype(int)
    return [[BOS_ID] + list(vocab.encode(t))[-n:] for t, n in zip(texts, lengths)]


@pytest.mark.slow
def test_engine_single_prompt_path_and_transformers_agree(tmp_path):
    from kinoe_jax.data.vocab import get_vocabulary
    from kinoe_jax.inference.texts import generate_ids
    from kinoe_jax.hf.export import convert_to_hf
    from kinoe_jax.inference import Engine, load_for_inference

    work = sft_runs()["sft"]
    hf_dir = tmp_path / "hf"
    convert_to_hf(os.path.join(work, "checkpoints"), str(hf_dir), progress=False, log=lambda *a: None)
    cfg, params = load_for_inference(work)
    vocab = get_vocabulary()
    prompts = _prompts(vocab)
    assert len(prompts) == 20 and len({len(p) for p in prompts}) == 20
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    stops = json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]

    engine = Engine(cfg, params, batch_size=16)
    batched = [c.ids for c in engine.generate(prompts, NEW_TOKENS, stop_ids=stops)]
    single = [generate_ids(cfg, params, p, NEW_TOKENS, stop_ids=tuple(stops)) for p in prompts]
    with torch.no_grad():
        hf = []
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops,
                                 pad_token_id=0)[0, len(p):].tolist()
            cut = [i for i, t in enumerate(out) if t in stops]
            hf.append(out[:cut[0]] if cut else out)  # transformers keeps the stop token; kinoe does not
    assert batched == single
    assert batched == hf
    assert sum(len(x) for x in batched) > 5 * len(prompts)  # real continuations, not empty stops

    # Log-likelihoods of each prompt's own greedy continuation (and of a fixed one) after it.
    fixed = list(vocab.encode("でした。"))
    pairs = [(p, x) for p, x in zip(prompts, batched) if x] + [(p, fixed) for p in prompts]
    ours = engine.loglikelihood(pairs)
    with torch.no_grad():
        for (context, continuation), got in zip(pairs, ours):
            seq = context + continuation
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), dim=-1)
            want = sum(float(logp[t - 1, seq[t]]) for t in range(len(context), len(seq)))
            assert abs(got.logprob - want) < 1e-4, (got.logprob, want)
    assert all(x.is_greedy for x in ours[:len(pairs) - len(prompts)])
