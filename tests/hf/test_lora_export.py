"""A LoRA checkpoint leaves JAX merged, as its base, or as a PEFT adapter that peft loads onto the
exported base; all three compute what kinoe computes, and bad requests are refused in one line."""

import dataclasses
import json
import os
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from tools import convert_to_hf as to_hf_tool

from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
from kinoe_jax.hf import convert_to_hf
from kinoe_jax.hf.mapping import param_shapes
from kinoe_jax.hf.safetensors_io import SafetensorsReader
from kinoe_jax.models import ModelConfig
from kinoe_jax.models import lora
from kinoe_jax.models.lora import LoraConfig

BASE = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=64)
LORA = dataclasses.replace(BASE, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1))
PROMPT = "むかしむかし、あるところに"


def _random_params(cfg, seed=0):
    """Weights of a large scale (greedy decoding then changes token at almost every step) and
    adapters as after training: B nonzero, or the adapter would prove nothing."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in param_shapes(cfg).items():
        if path[-1] == "scale":
            flat[path] = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        else:
            flat[path] = (0.1 if path[-1] == "lora_b" else 0.2) * rng.standard_normal(shape, np.float32)
    from kinoe_jax.hf.orbax_io import nest

    return nest(flat)


def _save(work, cfg, params, step):
    """DIR/checkpoints/<step> through the training manager, and the run's tokenizer beside it."""
    from kinoe_jax.training import checkpoint as ckpt_lib

    manager = ckpt_lib.make_manager(str(work / "checkpoints"), ckpt_lib.CheckpointConfig(async_save=False))
    state = {"step": jnp.int32(step), "params": {k: v for k, v in params.items()}}
    ckpt_lib.save(manager, step, state, None, dataclasses.asdict(cfg), force=True)
    manager.wait_until_finished()
    manager.close()
    shutil.copyfile(BUILTIN_TOKENIZER, work / "tokenizer.model")
    return work / "checkpoints"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run and a LoRA run on top of it (the base frozen, the adapters trained)."""
    root = tmp_path_factory.mktemp("lora_export")
    params = _random_params(LORA)
    base_ckpt = _save(root / "base", BASE, lora.base_only(params), 3)
    lora_ckpt = _save(root / "lora", LORA, params, 9)
    base_hf = root / "hf_base"
    convert_to_hf(str(base_ckpt), str(base_hf), progress=False)
    return root, params, lora_ckpt, base_hf


def _cut(ids, stops):
    cut = [i for i, t in enumerate(ids) if t in stops]
    return ids[:cut[0]] if cut else ids  # kinoe stops before the stop token, transformers includes it


def test_adapter_loads_in_peft_and_matches_kinoe_and_the_merged_model(runs, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kinoe_jax.inference.loading import load_for_inference
    from kinoe_jax.inference.texts import generate_ids
    from kinoe_jax.hf.verify import kinoe_logits

    root, params, lora_ckpt, base_hf = runs
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    tool = to_hf_tool
    assert tool.main([f"--checkpoint_dir={lora_ckpt}", f"--output_dir={merged}", "--verify", "--no_progress"]) == 0
    assert tool.main([f"--checkpoint_dir={lora_ckpt}", f"--output_dir={adapter}", "--lora=adapter",
                      f"--base_model={base_hf}", "--verify", "--no_progress"]) == 0

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                   "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.1,
        "base_model_name_or_path": str(base_hf)}
    assert config["target_modules"] == sorted(lora.TARGETS)
    stored = SafetensorsReader(str(adapter), "adapter_model.safetensors").tensors
    assert len(stored) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert stored["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, 32)
    assert stored["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (16, 4)

    def base():
        return AutoModelForCausalLM.from_pretrained(str(base_hf), dtype=torch.float32).eval()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base(), str(adapter)).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    again = peft_model.load_adapter(str(adapter), adapter_name="second")
    assert list(again.missing_keys) == [] and list(again.unexpected_keys) == []
    peft_model.set_adapter("default")
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()

    tok = AutoTokenizer.from_pretrained(str(base_hf))
    ids = tok(PROMPT)["input_ids"]
    cfg, restored = load_for_inference(str(root / "lora"))
    assert cfg == LORA
    ours = kinoe_logits(cfg, restored, ids)
    with torch.no_grad():
        via_peft = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        via_merged = merged_model(torch.tensor([ids])).logits[0].numpy()
        plain = base()(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(via_peft, ours, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(via_merged, ours, atol=1e-4, rtol=1e-4)
    assert np.max(np.abs(plain - ours)) > 1.0  # the adapters matter: the base alone is far off

    n = 16
    stops = merged_model.generation_config.eos_token_id
    stops = tuple(stops) if isinstance(stops, list) else (stops,)
    with torch.no_grad():
        gen = dict(max_new_tokens=n, do_sample=False)
        by_peft = peft_model.generate(input_ids=torch.tensor([ids]), **gen)[0, len(ids):].tolist()
        by_merged = merged_model.generate(torch.tensor([ids]), **gen)[0, len(ids):].tolist()
    by_kinoe = generate_ids(cfg, restored, ids, max_new_tokens=n, stop_ids=stops)
    assert _cut(by_peft, stops) == _cut(by_merged, stops) == by_kinoe
    assert len(set(by_kinoe)) > 4


def test_base_export_is_the_base_runs_export(runs, tmp_path):
    _, _, lora_ckpt, base_hf = runs
    out = tmp_path / "base"
    convert_to_hf(str(lora_ckpt), str(out), lora="base", progress=False)
    ours, theirs = SafetensorsReader(str(out)), SafetensorsReader(str(base_hf))
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    for name in ours.tensors:
        np.testing.assert_array_equal(ours.read(name), theirs.read(name))


def _refused(argv, out, capsys, message):
    assert to_hf_tool.main(argv + [f"--output_dir={out}", "--no_progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not [p for p in os.listdir(out.parent) if p.startswith(f".{out.name}.")]


def test_bad_requests_are_refused_in_one_line(runs, tmp_path, capsys):
    root, params, lora_ckpt, base_hf = runs
    out = tmp_path / "out"
    base_ckpt = root / "base" / "checkpoints"
    _refused([f"--checkpoint_dir={base_ckpt}", "--lora=adapter", f"--base_model={base_hf}"], out, capsys,
             "was not trained with LoRA (its model_config has no lora)")
    _refused([f"--checkpoint_dir={lora_ckpt}", "--lora=adapter"], out, capsys, "--lora=adapter needs --base_model")
    _refused([f"--checkpoint_dir={lora_ckpt}", f"--base_model={base_hf}"], out, capsys,
             "--base_model is only read with --lora=adapter")
    # A base of another shape: the adapter's k_proj (32 -> 16) cannot apply to a 32 -> 8 projection.
    other = dataclasses.replace(BASE, num_kv_heads=1)
    other_hf = tmp_path / "other_hf"
    convert_to_hf(str(_save(tmp_path / "other", other, _random_params(other), 1)), str(other_hf), progress=False)
    _refused([f"--checkpoint_dir={lora_ckpt}", "--lora=adapter", f"--base_model={other_hf}"], out, capsys,
             "does not match the adapter's shapes: k_proj is 32 -> 8 there, 32 -> 16 here")
    _refused([f"--checkpoint_dir={lora_ckpt}", "--lora=adapter", f"--base_model={tmp_path / 'nowhere'}"], out,
             capsys, "neither a directory nor a model transformers can fetch")


@pytest.mark.parametrize("lora_fields, message", [
    ({"targets": ["q_proj", "qkv"]}, "unknown target module(s) ['qkv']"),
    ({"rank": 0}, "rank 0 must be an integer >= 1"),
    ({"rank": 40}, "LoRA rank 40 is larger than q_proj (32 -> 32)"),
])
def test_bad_lora_config_in_a_checkpoint(runs, tmp_path, capsys, lora_fields, message):
    _, _, lora_ckpt, base_hf = runs
    work = tmp_path / "run"
    shutil.copytree(lora_ckpt.parent, work)
    meta = work / "checkpoints" / "9" / "model_config" / "metadata"
    fields = json.loads(meta.read_text())
    meta.write_text(json.dumps({**fields, "lora": {**fields["lora"], **lora_fields}}))
    _refused([f"--checkpoint_dir={work}/checkpoints", "--lora=adapter", f"--base_model={base_hf}"],
             tmp_path / "out", capsys, message)


def test_warns_when_the_base_model_has_other_weights(runs, tmp_path):
    root, params, lora_ckpt, _ = runs
    other_hf = tmp_path / "other_hf"
    convert_to_hf(str(_save(tmp_path / "other", BASE, _random_params(BASE, seed=5), 1)), str(other_hf), progress=False)
    lines = []
    convert_to_hf(str(lora_ckpt), str(tmp_path / "adapter"), lora="adapter", base_model=str(other_hf),
                  progress=False, log=lines.append)
    assert any("differs from the checkpoint's frozen base" in line for line in lines), lines
