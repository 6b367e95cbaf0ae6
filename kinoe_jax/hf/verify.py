"""Run the JAX model and the exported HF model on the same Japanese text and compare logits.

Both sides run in float32 on the *exported* weights (rounded to the export dtype and back), so
the export dtype's own rounding cannot hide or fake a conversion error: what is left is float32
arithmetic noise, and the tolerance is float32's. The effect of the rounding itself is reported
separately, for information.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from kinoe_jax.hf.mapping import ConversionError
from kinoe_jax.hf.orbax_io import load_params
from kinoe_jax.hf.safetensors_io import NP_DTYPES, ST_DTYPES

TEXTS = (
    "日本の四季について説明してください。",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "<|user|>\n東京から大阪まで新幹線で何時間かかりますか？<|end|>\n<|assistant|>\n",
    "ＧＰＵとTPUで学習した、ｶﾀｶﾅと𠮷野家😀も含む文です。\n  二行目 ",
)
ATOL = RTOL = 1e-4


def kinoe_logits(cfg, params, ids: list[int]) -> np.ndarray:
    return kinoe_logits_batch(cfg, params, [ids])[0]


def kinoe_logits_batch(cfg, params, seqs: list[list[int]], bucket: int = 32) -> list[np.ndarray]:
    """Logits of several sequences in one call, padded to a multiple of `bucket` (one compile)."""
    length = -(-max(len(s) for s in seqs) // bucket) * bucket
    tokens = np.zeros((len(seqs), length), np.int32)
    segments = np.zeros((len(seqs), length), np.int32)
    for row, ids in enumerate(seqs):
        tokens[row, :len(ids)] = ids
        segments[row, :len(ids)] = 1  # padding (segment 0) is masked out and sees nothing
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    logits, _ = _forward(cfg)(params, tokens, positions, segments)
    logits = np.asarray(logits)
    return [logits[row, :len(ids)] for row, ids in enumerate(seqs)]


@functools.lru_cache(maxsize=8)
def _forward(cfg):
    from kinoe_jax.models import Transformer

    # HF Mixtral is dropless: a model trained with an expert capacity is compared as kinoe
    # computes it without one.
    cfg = dataclasses.replace(cfg, dtype="float32", remat_policy="none", moe_capacity_factor=0.0)
    model = Transformer(cfg)
    return jax.jit(lambda params, tokens, positions, segments: model.apply({"params": params}, tokens,
                                                                         positions, segments))


def hf_model(hf_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                      output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise ConversionError(f"{hf_dir}: transformers reports {bad}")
    return model.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def verify_export(reader, cfg, hf_dir: str, dtype: str, texts=TEXTS, log=print) -> dict:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=f"{hf_dir}/tokenizer.model")
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    seqs = []
    for text in texts:
        ids = [sp.bos_id()] + sp.encode(text)
        got = hf_tok(text)["input_ids"]
        if got != ids:
            raise ConversionError(f"verify: HF tokenizer gives {got} for {text!r}, training ids are {ids}")
        seqs.append(ids)

    rounded = NP_DTYPES[ST_DTYPES[dtype]]
    exact = load_params(reader, lambda a: a.astype(np.float32))
    as_exported = jax.tree.map(lambda a: a.astype(rounded).astype(np.float32), exact)
    model = hf_model(hf_dir)
    ok, worst, report = True, 0.0, {"sequences": []}
    refs = kinoe_logits_batch(cfg, as_exported, seqs)
    unrounded = kinoe_logits_batch(cfg, exact, seqs) if dtype != "float32" else refs
    for ids, ref, raw in zip(seqs, refs, unrounded):
        got = hf_logits(model, ids)
        diff = float(np.max(np.abs(ref - got)))
        allowed = ATOL + RTOL * float(np.max(np.abs(ref)))
        row = {"tokens": len(ids), "max_abs_diff": diff, "allowed": allowed,
               "argmax_agree": float(np.mean(ref.argmax(-1) == got.argmax(-1)))}
        if dtype != "float32":
            row["rounding_effect"] = float(np.max(np.abs(raw - ref)))
        report["sequences"].append(row)
        ok = ok and diff <= allowed
        worst = max(worst, diff / max(allowed, 1e-30))
        log("verify: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    report["ok"] = ok
    if not report["ok"]:
        raise ConversionError(f"verify FAILED: JAX and HF logits differ beyond float32 tolerance "
                              f"(atol={ATOL}, rtol={RTOL}): {report['sequences']}")
    log(f"verify: OK ({len(seqs)} sequences, worst diff {worst:.2g} of the tolerance)")
    return report
