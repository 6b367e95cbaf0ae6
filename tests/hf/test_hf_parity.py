"""Same weights, same logits: random tiny HF models through kinoe and back.

Each case builds a transformers model from its own config class with random weights (norms
included, at a scale that makes logits large enough for a mapping error to show), imports it,
compares the JAX logits with transformers' at 1e-4 in float32, exports it again and checks the
tensors are bit-identical to the originals.
"""

import json
import shutil

import numpy as np
import pytest

from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
from kinoe_jax.hf import convert_from_hf, convert_to_hf
from kinoe_jax.hf.orbax_io import CheckpointReader, load_params
from kinoe_jax.hf.verify import kinoe_logits
from kinoe_jax.models import ModelConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=4000, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64)
CASES = {
    # GQA, a window shorter than the sequence, untied head, non-default theta.
    "mistral_gqa_window": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                                 rope_theta=50000.0, tie_word_embeddings=False)),
    # Plain multi-head attention, tied embeddings, head_dim != hidden / heads.
    "mistral_mha_tied_headdim": ("MistralConfig", dict(num_attention_heads=3, num_key_value_heads=3, head_dim=20,
                                                       sliding_window=None, tie_word_embeddings=True)),
    # Llama is imported (and re-exported as the equivalent Mistral).
    "llama_mqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=20000.0)),
    "mixtral_window": ("MixtralConfig", dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2, sliding_window=7, intermediate_size=40)),
}
SEQ = 24


def _random_model(kind: str, overrides: dict, seed: int = 0):
    cls = getattr(transformers, kind)
    config = cls(**{**COMMON, **overrides})
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tensors(directory) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def imported(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    model = _random_model(kind, overrides)
    model.save_pretrained(tmp / "hf_in")
    shutil.copyfile(BUILTIN_TOKENIZER, tmp / "hf_in" / "tokenizer.model")
    result = convert_from_hf(str(tmp / "hf_in"), str(tmp / "kinoe"), params_only=True, progress=False)
    return request.param, model, tmp, result


def test_logits_match_transformers(imported):
    name, model, tmp, result = imported
    cfg = result.model_config
    reader = CheckpointReader(str(tmp / "kinoe" / "checkpoints"))
    assert ModelConfig(**reader.model_config) == cfg
    params = load_params(reader)
    rng = np.random.default_rng(1)
    for attn in ("eager", "sdpa"):
        model.config._attn_implementation = attn
        for _ in range(2):
            ids = [3] + rng.integers(4, 4000, SEQ - 1).tolist()
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            got = kinoe_logits(cfg, params, ids)
            assert ref.std() > 1.0  # large enough that a wrong mapping could not pass
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{name} ({attn})")


def test_round_trip_is_bit_identical(imported):
    name, _, tmp, _ = imported
    out = tmp / f"hf_out_{name}"
    convert_to_hf(str(tmp / "kinoe" / "checkpoints"), str(out), dtype="float32", progress=False,
                  max_shard_bytes=200_000)
    original, exported = _tensors(tmp / "hf_in"), _tensors(out)
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert set(index["weight_map"]) == set(original)
    if "llama" in name:
        assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]


def test_bfloat16_round_trip_is_bit_identical(tmp_path):
    model = _random_model("MistralConfig", CASES["mistral_gqa_window"][1]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf_in")
    shutil.copyfile(BUILTIN_TOKENIZER, tmp_path / "hf_in" / "tokenizer.model")
    convert_from_hf(str(tmp_path / "hf_in"), str(tmp_path / "kinoe"), progress=False)
    convert_to_hf(str(tmp_path / "kinoe" / "checkpoints"), str(tmp_path / "hf_out"), dtype="bfloat16",
                  progress=False)
    original, exported = _tensors(tmp_path / "hf_in"), _tensors(tmp_path / "hf_out")
    assert sorted(original) == sorted(exported)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype
        assert exported[key].tobytes() == value.tobytes(), key
