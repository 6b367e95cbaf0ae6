"""ModelConfig <-> HF config.json (MistralForCausalLM, MixtralForCausalLM; LlamaForCausalLM on import).

The HF side is read and written as plain JSON, so the import path needs no torch. Everything a
HF class cannot represent exactly is refused up front, with every reason at once.
"""

from __future__ import annotations

import json
import os

from kinoe_jax.hf.mapping import ConversionError
from kinoe_jax.models.config import ModelConfig

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_IMPORT = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM", "llama": "LlamaForCausalLM"}
# HF class defaults when a config.json omits rope theta.
_DEFAULT_THETA = {"mistral": 10000.0, "mixtral": 1000000.0, "llama": 10000.0}


def export_problems(cfg: ModelConfig) -> list[str]:
    """Why `cfg` cannot be written as a HF Mistral/Mixtral (empty: it can)."""
    problems = []
    if cfg.rotary_dim != cfg.dim_per_head:
        problems.append(
            f"rotary is applied to {cfg.rotary_dim} of {cfg.dim_per_head} dims per head "
            f"(rotary_fraction={cfg.rotary_fraction}); HF Mistral/Mixtral rotate every dim of the head, "
            "so the exported model would attend differently. Only models trained with "
            "rotary_fraction=1.0 can be exported")
    if cfg.num_experts:
        if cfg.moe_layer_period != 1 or cfg.moe_layer_offset != 0:
            problems.append(
                f"MoE on every {cfg.moe_layer_period}-th layer (offset {cfg.moe_layer_offset}); HF Mixtral "
                "has experts in every layer and no dense layers in between")
    return problems


def to_hf_config(cfg: ModelConfig, dtype: str, special_ids: dict[str, int]) -> dict:
    """config.json for the exported model; raises ConversionError if HF cannot represent `cfg`."""
    if dtype not in EXPORT_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} not one of {EXPORT_DTYPES}")
    problems = export_problems(cfg)
    if problems:
        raise ConversionError("cannot export this model to Hugging Face exactly:\n  - " + "\n  - ".join(problems))
    moe = cfg.num_experts > 0
    out = {
        "architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
        "model_type": "mixtral" if moe else "mistral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        # Older readers take rope_theta at the top level, transformers 5 reads rope_parameters.
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        # Same semantics as kinoe: a query sees keys with q - k < sliding_window.
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["pad"],
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if moe:
        out.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   output_router_logits=False, router_jitter_noise=0.0)
    return out


def generation_config(special_ids: dict[str, int], stop_ids: list[int] | None = None) -> dict:
    eos = stop_ids if stop_ids and len(stop_ids) > 1 else special_ids["eos"]
    return {"bos_token_id": special_ids["bos"], "eos_token_id": eos,
            "pad_token_id": special_ids["pad"], "do_sample": False}


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"HF directory {hf_dir} does not exist")
    if not os.path.exists(path):
        raise ConversionError(f"{path} missing: not a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def _rope_theta(hf: dict, model_type: str, problems: list[str]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for name, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            problems.append(f"{name} type {kind!r}: kinoe implements plain rotary only")
    theta = params.get("rope_theta", hf.get("rope_theta", _DEFAULT_THETA[model_type]))
    return float(theta)


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of a HF Mistral/Mixtral/Llama config; refuses what kinoe cannot compute."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED_IMPORT:
        raise ConversionError(
            f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
            f"supported: {sorted(SUPPORTED_IMPORT.values())}")
    problems = []
    if archs and archs != [SUPPORTED_IMPORT[model_type]]:
        problems.append(f"architectures {archs}: only {SUPPORTED_IMPORT[model_type]} weights are read")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r}: kinoe's MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"{flag}=true: kinoe layers have no biases")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1 is not read by HF Mistral/Llama; refusing an ambiguous model")
    if hf.get("layer_types") and len(set(hf["layer_types"])) > 1:
        problems.append(f"mixed layer_types {sorted(set(hf['layer_types']))}: kinoe uses one attention type")
    theta = _rope_theta(hf, model_type, problems)
    heads = hf["num_attention_heads"]
    sliding = hf.get("sliding_window") if model_type in ("mistral", "mixtral") else None
    if model_type == "mistral" and hf.get("use_sliding_window") is False:
        sliding = None
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or None, rope_theta=theta, sliding_window=sliding,
        max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02), dtype=_compute_dtype(hf), scan_layers=True)
    if fields["head_dim"] == fields["hidden_size"] // heads:
        fields["head_dim"] = None
    if model_type == "mixtral":
        fields.update(num_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                      moe_layer_period=1, moe_layer_offset=0)
    if problems:
        raise ConversionError(f"{source}: cannot convert exactly:\n  - " + "\n  - ".join(problems))
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from e


def _compute_dtype(hf: dict) -> str:
    """kinoe keeps parameters in fp32; this is only the compute dtype of continued training."""
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return "float32" if dtype == "float32" else "bfloat16"


# What the weights mean. Everything else in ModelConfig (remat, MoE kernels and losses, ...) is a
# training choice left to the run config.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                       "head_dim", "rope_theta", "rotary_fraction", "sliding_window", "max_seq_len", "norm_eps",
                       "tie_embeddings", "init_std", "dtype", "scan_layers", "num_experts")
MOE_FIELDS = ("num_experts_per_tok", "moe_layer_period", "moe_layer_offset")


def gin_text(cfg: ModelConfig, source: str) -> str:
    """The ModelConfig bindings `cfg` implies, in gin_configs/models/ style."""
    lines = [f"# ModelConfig implied by {source}.",
             "# Parameters are stored in float32; ModelConfig.dtype is only the compute dtype.",
             "# scan_layers must stay True: the checkpoint holds the layers stacked."]
    for name in ARCHITECTURE_FIELDS + (MOE_FIELDS if cfg.num_experts else ()):
        lines.append(f"ModelConfig.{name} = {_gin_value(getattr(cfg, name))}")
    return "\n".join(lines) + "\n"


def _gin_value(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
