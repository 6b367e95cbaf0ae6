"""Run the JAX model and the exported HF model on the same Japanese text and compare logits.

Both sides run in float32 on the *exported* weights (rounded to the export dtype and back), so
the export dtype's own rounding cannot hide or fake a conversion error: what is left is float32
arithmetic noise, and the tolerance is float32's. The effect of the rounding itself is reported
separately, for information.

A LoRA checkpoint is checked against what it computes in training (adapters unmerged), beside the
merged weights as exported; a PEFT adapter directory is checked loaded by peft onto its base.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
import sentencepiece as spm

from kinoe_jax.hf.importer import lazy_params
from kinoe_jax.hf.mapping import ConversionError, entries, param_shapes
from kinoe_jax.hf.orbax_io import load_params, nest
from kinoe_jax.hf.peft_adapter import WEIGHTS_FILE, base_config
from kinoe_jax.hf.safetensors_io import NP_DTYPES, ST_DTYPES, SafetensorsReader
from kinoe_jax.models import Transformer
from kinoe_jax.models import lora as lora_lib

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
    # HF Mixtral is dropless: a model trained with an expert capacity is compared as kinoe
    # computes it without one.
    cfg = dataclasses.replace(cfg, dtype="float32", remat_policy="none", moe_capacity_factor=0.0)
    model = Transformer(cfg)
    return jax.jit(lambda params, tokens, positions, segments: model.apply({"params": params}, tokens,
                                                                         positions, segments))


def hf_model(hf_dir: str):
    # optional: the hf extra
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                      output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise ConversionError(f"{hf_dir}: transformers reports {bad}")
    return model.eval()


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch  # noqa: PLC0415 (optional: the hf extra)

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _token_ids(sp_model: str, texts, hf_tok_dir: str | None = None) -> list[list[int]]:
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    hf_tok = None
    if hf_tok_dir:
        from transformers import AutoTokenizer  # noqa: PLC0415 (optional: the hf extra)

        hf_tok = AutoTokenizer.from_pretrained(hf_tok_dir)
    seqs = []
    for text in texts:
        ids = [sp.bos_id()] + sp.encode(text)
        got = hf_tok(text)["input_ids"] if hf_tok else ids
        if got != ids:
            raise ConversionError(f"verify: HF tokenizer gives {got} for {text!r}, training ids are {ids}")
        seqs.append(ids)
    return seqs


def _compare(seqs, refs, hf_fn, log, extra=None) -> dict:
    """Rows of max |kinoe - HF| per sequence against float32's tolerance; raises if any exceeds it.

    `extra` maps a name to other kinoe logits that must also match HF (reported as <name>_diff).
    """
    ok, worst, report = True, 0.0, {"sequences": []}
    for i, (ids, ref) in enumerate(zip(seqs, refs)):
        got = hf_fn(ids)
        allowed = ATOL + RTOL * float(np.max(np.abs(ref)))
        row = {"tokens": len(ids), "max_abs_diff": float(np.max(np.abs(ref - got))), "allowed": allowed,
               "argmax_agree": float(np.mean(ref.argmax(-1) == got.argmax(-1)))}
        diffs = [row["max_abs_diff"]]
        for name, logits in (extra or {}).items():
            row[f"{name}_diff"] = float(np.max(np.abs(logits[i] - got)))
            diffs.append(row[f"{name}_diff"])
        report["sequences"].append(row)
        ok = ok and max(diffs) <= allowed
        worst = max(worst, max(diffs) / max(allowed, 1e-30))
        log("verify: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    report["ok"] = ok
    if not ok:
        raise ConversionError(f"verify FAILED: JAX and HF logits differ beyond float32 tolerance "
                              f"(atol={ATOL}, rtol={RTOL}): {report['sequences']}")
    log(f"verify: OK ({len(seqs)} sequences, worst diff {worst:.2g} of the tolerance)")
    return report


def verify_export(reader, cfg, hf_dir: str, dtype: str, texts=TEXTS, log=print, lora_mode: str = "merge") -> dict:
    seqs = _token_ids(f"{hf_dir}/tokenizer.model", texts, hf_dir)
    rounded = NP_DTYPES[ST_DTYPES[dtype]]
    exact = load_params(reader, lambda a: a.astype(np.float32))
    base_cfg = base_config(cfg)
    # What the directory holds, computed by kinoe: the (merged or base) weights, rounded.
    exported = lora_lib.merge(cfg, exact) if lora_mode == "merge" else lora_lib.base_only(exact)
    as_exported = jax.tree.map(lambda a: a.astype(rounded).astype(np.float32), exported)
    refs = kinoe_logits_batch(base_cfg, as_exported, seqs)
    # What training computed: adapters applied on the fly, nothing rounded.
    trained_cfg = cfg if lora_mode == "merge" else base_cfg
    merged_lora = cfg.lora is not None and lora_mode == "merge"
    trained = kinoe_logits_batch(trained_cfg, exact, seqs) if dtype != "float32" or merged_lora else refs
    model = hf_model(hf_dir)
    extra = {"adapters_unmerged": trained} if merged_lora and dtype == "float32" else None
    report = _compare(seqs, refs, lambda ids: hf_logits(model, ids), log, extra)
    if dtype != "float32":
        for row, ref, raw in zip(report["sequences"], refs, trained):
            row["rounding_effect"] = float(np.max(np.abs(raw - ref)))
        effects = ", ".join(f"{r['rounding_effect']:.3g}" for r in report["sequences"])
        log(f"verify: rounding effect of --dtype {dtype}: {effects}")
    return report


def _hf_base_params(cfg, base_dir: str) -> dict:
    """The HF base model's weights in kinoe's layout (through the one mapping table)."""
    shapes = param_shapes(cfg)
    lazy = lazy_params(SafetensorsReader(base_dir), entries(cfg, shapes), shapes)
    flat = jax.tree_util.tree_flatten_with_path(lazy, is_leaf=lambda x: hasattr(x, "pieces"))[0]
    out = {}
    for path, arr in flat:
        value = np.empty(arr.shape, np.float32)
        for index, load in arr.pieces():
            value[index] = load()
        out[tuple(k.key for k in path)] = value
    return nest(out)


def verify_adapter(reader, cfg, adapter_dir: str, base_model: str, dtype: str, texts=TEXTS, log=print) -> dict:
    """peft loads the adapter onto `base_model` with every key accounted for, and the result computes
    what kinoe computes with the same base weights and the adapters as written."""
    # optional: the hf extra
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415
    from peft.utils import get_peft_model_state_dict  # noqa: PLC0415

    if not os.path.isdir(base_model):
        raise ConversionError(f"--verify with --lora=adapter compares against the base weights: --base_model "
                              f"{base_model} must be a local HF directory")
    seqs = _token_ids(f"{adapter_dir}/tokenizer.model", texts)
    peft_model = PeftModel.from_pretrained(hf_model(base_model), adapter_dir).eval()
    written = SafetensorsReader(adapter_dir, WEIGHTS_FILE)
    loaded = {k: v.float().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    missing, unexpected = sorted(set(loaded) - set(written.tensors)), sorted(set(written.tensors) - set(loaded))
    if missing or unexpected:
        raise ConversionError(f"verify: peft expects adapter keys {missing[:4]} that {WEIGHTS_FILE} lacks, "
                              f"and ignores {unexpected[:4]} that it has")
    for name, value in loaded.items():
        if not np.array_equal(value, written.read(name).astype(np.float32)):
            raise ConversionError(f"verify: peft holds {name} with other values than {WEIGHTS_FILE}")
    rounded = NP_DTYPES[ST_DTYPES[dtype]]
    adapters = nest({leaf: reader.read(leaf).astype(rounded).astype(np.float32)
                     for leaf in reader.leaves if lora_lib.is_adapter(leaf)})
    params = lora_lib.combine(_hf_base_params(base_config(cfg), base_model), adapters)
    refs = kinoe_logits_batch(cfg, params, seqs)

    def peft_logits(ids):
        with torch.no_grad():
            return peft_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

    log(f"verify: peft {len(loaded)} adapter tensors loaded onto {base_model}, none missing or unexpected")
    return _compare(seqs, refs, peft_logits, log)
