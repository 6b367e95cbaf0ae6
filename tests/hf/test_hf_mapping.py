"""The mapping table and the config translation: complete, invertible, and loud when it must refuse."""

import dataclasses
import json
import os

import numpy as np
import pytest

from kinoe_jax.hf import hf_config
from kinoe_jax.hf.mapping import RULES, ConversionError, entries, param_shapes
from kinoe_jax.models import ModelConfig

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
            max_seq_len=32)
CONFIGS = {
    "dense_scanned": ModelConfig(**BASE),
    "dense_unscanned_tied": ModelConfig(**BASE, scan_layers=False, tie_embeddings=True),
    "moe_scanned": ModelConfig(**BASE, num_experts=4),
    "moe_every_2nd_scanned": ModelConfig(**BASE, num_experts=4, moe_layer_period=2, moe_layer_offset=1),
    "moe_every_2nd_unscanned": ModelConfig(**BASE, num_experts=4, moe_layer_period=2, scan_layers=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_parameter_is_mapped_once(name):
    cfg = CONFIGS[name]
    shapes = param_shapes(cfg)
    ents = entries(cfg, shapes)  # raises if any parameter slice is unmapped or mapped twice
    names = [e.hf_name for e in ents]
    assert len(names) == len(set(names))
    mapped = sum(int(np.prod(e.kinoe_shape)) for e in ents)
    assert mapped == sum(int(np.prod(s)) for s in shapes.values()) == cfg.num_params()
    assert ("lm_head.weight" in names) == (not cfg.tie_embeddings)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    assert sum(".block_sparse_moe.gate." in n for n in names) == n_moe
    assert sum(".mlp.gate_proj." in n for n in names) == cfg.num_layers - n_moe


def test_entries_are_leaf_major():
    # The exporter reads each stacked leaf once: all its layers must be consecutive.
    ents = entries(CONFIGS["dense_scanned"], param_shapes(CONFIGS["dense_scanned"]))
    order = [e.leaf for e in ents]
    runs = [leaf for i, leaf in enumerate(order) if i == 0 or order[i - 1] != leaf]
    assert len(runs) == len(set(runs))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.hf)
def test_transforms_invert(rule):
    cfg = CONFIGS["moe_scanned"] if "moe" in rule.kinoe else CONFIGS["dense_scanned"]
    shapes = param_shapes(cfg)
    e = next(e for e in entries(cfg, shapes) if e.hf_name == rule.hf.format(layer=0, expert=1)
             or e.hf_name == rule.hf)
    x = np.random.default_rng(0).standard_normal(e.kinoe_shape).astype(np.float32)
    hf = e.transform.to_hf(x)
    assert hf.shape == e.hf_shape
    np.testing.assert_array_equal(e.transform.from_hf(hf, e.kinoe_shape), x)


def test_names_and_shapes_match_transformers_models(tmp_path):
    """Our HF names/shapes are exactly what transformers saves for the same config."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM

    torch.manual_seed(0)
    for cfg in (CONFIGS["dense_scanned"], CONFIGS["moe_scanned"], dataclasses.replace(CONFIGS["dense_scanned"],
                                                                                     tie_embeddings=True)):
        hf = hf_config.to_hf_config(cfg, "float32", {"bos": 3, "eos": 1, "pad": 0, "unk": 2})
        cls = MixtralForCausalLM if cfg.num_experts else MistralForCausalLM
        model = cls(cls.config_class.from_dict(hf))
        out = tmp_path / hf["model_type"]
        model.save_pretrained(out)
        with safe_open(out / "model.safetensors", "pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        ours = {e.hf_name: e.hf_shape for e in entries(cfg, param_shapes(cfg))}
        assert ours == saved
    # Llama (import only) uses Mistral's names.
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    cfg = hf_config.from_hf_config(llama.config.to_dict())
    assert {e.hf_name for e in entries(cfg, param_shapes(cfg))} == set(llama.state_dict())


@pytest.mark.parametrize("name", ["dense_scanned", "moe_scanned"])
def test_config_round_trip(name):
    cfg = dataclasses.replace(CONFIGS[name], sliding_window=16, rope_theta=5e5, head_dim=12, norm_eps=1e-6)
    hf = hf_config.to_hf_config(cfg, "bfloat16", {"bos": 3, "eos": 1, "pad": 0, "unk": 2})
    back = hf_config.from_hf_config(json.loads(json.dumps(hf)))
    for field in hf_config.ARCHITECTURE_FIELDS + hf_config.MOE_FIELDS:
        if field != "dtype":
            assert getattr(back, field) == getattr(cfg, field), field
    assert back.dtype == "bfloat16"


def test_transformers_reads_our_config_without_surprises():
    from transformers import AutoConfig

    cfg = dataclasses.replace(CONFIGS["dense_scanned"], sliding_window=16, rope_theta=5e5)
    hf = hf_config.to_hf_config(cfg, "float32", {"bos": 3, "eos": 1, "pad": 0, "unk": 2})
    loaded = AutoConfig.for_model(**hf)
    assert loaded.sliding_window == 16 and loaded.head_dim == cfg.dim_per_head
    assert loaded.rope_parameters["rope_theta"] == 5e5
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (3, 1, 0)


def test_export_refuses_partial_rotary_and_interleaved_moe():
    with pytest.raises(ConversionError, match=r"rotary is applied to 2 of 8 dims per head"):
        hf_config.to_hf_config(ModelConfig(**BASE, rotary_fraction=0.25), "float32", {})
    with pytest.raises(ConversionError, match="experts in every layer"):
        hf_config.to_hf_config(CONFIGS["moe_every_2nd_scanned"], "float32", {})
    with pytest.raises(ConversionError, match="--dtype"):
        hf_config.to_hf_config(CONFIGS["dense_scanned"], "int8", {})


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
])
def test_import_refuses_what_kinoe_cannot_compute(change, message):
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    hf.update(change)
    with pytest.raises(ConversionError, match=message):
        hf_config.from_hf_config(hf)


def test_gin_text_is_loadable(tmp_path):
    import gin

    cfg = dataclasses.replace(CONFIGS["moe_scanned"], sliding_window=8, dtype="bfloat16")
    path = tmp_path / "model.gin"
    path.write_text(hf_config.gin_text(cfg, "test"))
    gin.parse_config_file(os.fspath(path))
    got = ModelConfig()
    for field in hf_config.ARCHITECTURE_FIELDS + hf_config.MOE_FIELDS:
        assert getattr(got, field) == getattr(cfg, field), field
