"""The converters end to end: a trained model exported and decoded by transformers, training
resumed from an import, and every kind of bad input refused with nothing left behind."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import run_training
from tools import convert_from_hf as from_hf_tool, convert_to_hf as to_hf_tool

from kinoe_jax.data.vocab import BOS_ID, BUILTIN_TOKENIZER
from kinoe_jax.hf import ConversionError, convert_from_hf, convert_to_hf
from kinoe_jax.hf.synthetic import write_random_checkpoint
from kinoe_jax.models import ModelConfig
from kinoe_jax.utils.atomic import OutputExists

TINY = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=64)


def _nothing_left(out):
    """No output and no half-written sibling."""
    parent = out.parent
    assert not out.exists()
    if parent.exists():
        assert not [p for p in os.listdir(parent) if p.startswith(f".{out.name}.")], os.listdir(parent)


@pytest.fixture
def ckpt(tmp_path):
    """A workdir with a random tiny checkpoint at step 5 and its tokenizer."""
    work = tmp_path / "run"
    write_random_checkpoint(str(work / "checkpoints"), TINY, step=5)
    shutil.copyfile(BUILTIN_TOKENIZER, work / "tokenizer.model")
    return work


# ----------------------------------------------------------------------------- a trained model
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("trained") / "run"
    rows = run_training(work, ["train.total_steps = 20", "CheckpointConfig.save_every = 10",
                               "cosine_schedule.peak_lr = 3e-3"])
    return work, rows


def _greedy_both(checkpoint_workdir, hf_dir, prompt, n):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kinoe_jax.inference.loading import load_for_inference
    from kinoe_jax.inference.texts import generate_ids

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok(prompt)["input_ids"]
    assert ids[0] == BOS_ID
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    stops = model.generation_config.eos_token_id
    stops = tuple(stops) if isinstance(stops, list) else (stops,)
    assert stops == (1, 10)  # EOS and the chat template's <|end|>
    cut = [i for i, t in enumerate(hf) if t in stops]
    hf = hf[:cut[0]] if cut else hf  # kinoe stops before the stop token, transformers includes it
    cfg, params = load_for_inference(str(checkpoint_workdir))
    return hf, generate_ids(cfg, params, ids, max_new_tokens=n, stop_ids=stops)


@pytest.mark.slow
def test_trained_model_decodes_the_same_in_transformers(trained, tmp_path):
    work, rows = trained
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    out = tmp_path / "hf"
    assert to_hf_tool.main([f"--checkpoint_dir={work}/checkpoints", f"--output_dir={out}",
                            "--verify", "--no_progress"]) == 0
    assert sorted(os.listdir(out)) == sorted([
        "config.json", "generation_config.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"])
    hf, ours = _greedy_both(work, out, "日本の四季について", 12)
    assert hf == ours and len(ours) == 12


def test_random_model_decodes_the_same_in_transformers(ckpt, tmp_path):
    """A few dozen training steps only teach a tiny model its most frequent pieces; random weights
    of a large scale make greedy decoding pick a different token at almost every step."""
    out = tmp_path / "hf"
    convert_to_hf(str(ckpt / "checkpoints"), str(out), progress=False)
    hf, ours = _greedy_both(ckpt, out, "むかしむかし、あるところに", 16)
    assert hf == ours and len(set(ours)) > 4


@pytest.mark.slow
def test_older_step_in_bfloat16_verifies(trained, tmp_path):
    work, _ = trained
    out = tmp_path / "hf_bf16"
    result = convert_to_hf(str(work / "checkpoints"), str(out), step=10, dtype="bfloat16", verify=True,
                           progress=False)
    assert result.step == 10 and result.verification["ok"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["MistralForCausalLM"]


def test_import_is_what_train_py_restores(ckpt, tmp_path):
    """train.py's own restore paths read the imported checkpoint: resume (the full state, with the
    data iterator item present but empty) and load_params_from (params only)."""
    import jax
    import tensorflow as tf

    from kinoe_jax.training import checkpoint as ckpt_lib
    from kinoe_jax.training import optim
    from kinoe_jax.training import loop as train
    from kinoe_jax.inference.loading import load_for_inference
    from kinoe_jax.models import Transformer
    from kinoe_jax.parallel.mesh import make_mesh

    hf = tmp_path / "hf"
    convert_to_hf(str(ckpt / "checkpoints"), str(hf), progress=False)
    imported = tmp_path / "imported"
    assert from_hf_tool.main([f"--hf_dir={hf}", f"--output_dir={imported}", "--no_progress"]) == 0
    gin_text = (imported / "model_config.gin").read_text()
    assert "ModelConfig.num_layers = 2" in gin_text and 'tokenizer_path.path = "' in gin_text
    assert (imported / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()

    _, original = load_for_inference(str(ckpt))
    model = Transformer(TINY)
    tx, _ = optim.make_optimizer(10)
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        abstract, shardings, _ = train.abstract_state(model, TINY, tx, mesh, 16, False, 0)
        manager = ckpt_lib.make_manager(str(imported / "checkpoints"), ckpt_lib.CheckpointConfig(async_save=False))
        assert manager.latest_step() == 0
        state = ckpt_lib.restore(manager, 0, abstract, iter(tf.data.Dataset.range(3)))
        manager.close()
        seeded = train.restore_base_params(str(imported / "checkpoints"), None, abstract["params"], mesh)
    assert int(state["step"]) == 0
    for restored in (state["params"], seeded):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, original)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))


def test_block_reads_and_unscanned_layouts(ckpt, tmp_path):
    whole, blocks = tmp_path / "whole", tmp_path / "blocks"
    convert_to_hf(str(ckpt / "checkpoints"), str(whole), progress=False)
    convert_to_hf(str(ckpt / "checkpoints"), str(blocks), read_budget=1, progress=False)  # a layer per read
    for name in os.listdir(whole):
        assert (whole / name).read_bytes() == (blocks / name).read_bytes(), name
    # Unscanned layers (layers_i/...) and a tied head, checked against transformers by --verify.
    work = tmp_path / "unscanned"
    cfg = ModelConfig(**{**TINY.__dict__, "scan_layers": False, "tie_embeddings": True})
    write_random_checkpoint(str(work / "checkpoints"), cfg)
    shutil.copyfile(BUILTIN_TOKENIZER, work / "tokenizer.model")
    result = convert_to_hf(str(work / "checkpoints"), str(tmp_path / "hf_unscanned"), verify=True, progress=False)
    assert result.verification["ok"]


def test_relative_checkpoint_path_as_the_readme_writes_it(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--checkpoint_dir=run/checkpoints`, relative to where it runs
    whole, relative = tmp_path / "whole", tmp_path / "relative"
    convert_to_hf(str(ckpt / "checkpoints"), str(whole), progress=False)
    convert_to_hf("run/checkpoints", "relative", progress=False)
    for name in os.listdir(whole):
        assert (whole / name).read_bytes() == (relative / name).read_bytes(), name


def test_import_params_only(ckpt, tmp_path):
    hf = tmp_path / "hf"
    convert_to_hf(str(ckpt / "checkpoints"), str(hf), progress=False)
    result = convert_from_hf(str(hf), str(tmp_path / "imported"), params_only=True, progress=False)
    from kinoe_jax.hf.orbax_io import CheckpointReader

    reader = CheckpointReader(result.checkpoint_dir)
    assert reader.step == 0 and ("embed", "embedding") in reader.leaves


# ----------------------------------------------------------------------------- bad input
def test_missing_step(ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"step 7 not in .*available: \[5\]"):
        convert_to_hf(str(ckpt / "checkpoints"), str(out), step=7, progress=False)
    _nothing_left(out)


def test_nonexistent_directories(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="does not exist"):
        convert_to_hf(str(tmp_path / "nope" / "checkpoints"), str(out), progress=False)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_from_hf(str(tmp_path / "nope"), str(out), progress=False)
    _nothing_left(out)


def test_truncated_checkpoint(ckpt, tmp_path):
    state = ckpt / "checkpoints" / "5" / "state"
    data = max((p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    out = tmp_path / "nested" / "out"
    with pytest.raises(ConversionError, match="truncated or corrupted"):
        convert_to_hf(str(ckpt / "checkpoints"), str(out), progress=False)
    _nothing_left(out)
    assert not out.parent.exists()  # the parent it created for the output is gone too


@pytest.mark.parametrize("damage, message", [
    ("state/_METADATA", "unreadable Orbax metadata"),
    ("model_config/metadata", "not valid JSON"),
])
def test_corrupted_checkpoint_files(ckpt, tmp_path, damage, message):
    (ckpt / "checkpoints" / "5" / damage).write_text("{garbage")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert_to_hf(str(ckpt / "checkpoints"), str(out), progress=False)
    _nothing_left(out)


def test_refuses_partial_rotary_before_writing(tmp_path):
    work = tmp_path / "run"
    cfg = ModelConfig(**{**TINY.__dict__, "rotary_fraction": 0.25})
    write_random_checkpoint(str(work / "checkpoints"), cfg)
    shutil.copyfile(BUILTIN_TOKENIZER, work / "tokenizer.model")
    out = tmp_path / "out"
    code = to_hf_tool.main([f"--checkpoint_dir={work}/checkpoints", f"--output_dir={out}",
                            "--no_progress"])
    assert code == 1
    _nothing_left(out)
    with pytest.raises(ConversionError, match="rotary is applied to 2 of 8 dims"):
        convert_to_hf(str(work / "checkpoints"), str(out), progress=False)


def test_params_that_disagree_with_model_config(ckpt, tmp_path):
    meta = ckpt / "checkpoints" / "5" / "model_config" / "metadata"
    fields = json.loads(meta.read_text())
    meta.write_text(json.dumps({**fields, "intermediate_size": 64}))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"mlp/gate_proj/kernel has shape \(2, 32, 48\)"):
        convert_to_hf(str(ckpt / "checkpoints"), str(out), progress=False)
    _nothing_left(out)


def test_existing_output_needs_overwrite(ckpt, tmp_path):
    out = tmp_path / "out"
    convert_to_hf(str(ckpt / "checkpoints"), str(out), progress=False)
    (out / "marker").write_text("old")
    with pytest.raises(OutputExists, match="--overwrite"):
        convert_to_hf(str(ckpt / "checkpoints"), str(out), progress=False)
    assert (out / "marker").exists()
    convert_to_hf(str(ckpt / "checkpoints"), str(out), overwrite=True, progress=False)
    assert not (out / "marker").exists() and (out / "config.json").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_failed_verification_prints_numbers_and_writes_nothing(ckpt, tmp_path, monkeypatch, capsys):
    from kinoe_jax.hf import verify

    monkeypatch.setattr(verify, "ATOL", -1.0)  # no logits can pass: the failure path itself is tested
    monkeypatch.setattr(verify, "RTOL", 0.0)
    out = tmp_path / "out"
    code = to_hf_tool.main([f"--checkpoint_dir={ckpt}/checkpoints", f"--output_dir={out}", "--verify",
                            "--no_progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "verify FAILED" in err and "max_abs_diff" in err
    _nothing_left(out)


# ----------------------------------------------------------------------------- bad HF input
@pytest.fixture
def hf_dir(ckpt, tmp_path):
    out = tmp_path / "hf"
    convert_to_hf(str(ckpt / "checkpoints"), str(out), progress=False)
    return out


def test_unsupported_architecture(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "qwen2",
                                                    "architectures": ["Qwen2ForCausalLM"]}))
    out = tmp_path / "kinoe"
    code = from_hf_tool.main([f"--hf_dir={hf_dir}", f"--output_dir={out}", "--no_progress"])
    assert code == 1
    with pytest.raises(ConversionError, match="model_type 'qwen2'.*not supported"):
        convert_from_hf(str(hf_dir), str(out), progress=False)
    _nothing_left(out)


def test_hf_weights_that_do_not_match(hf_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    shard = hf_dir / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "kinoe"
    with pytest.raises(ConversionError, match=r"(?s)missing model.layers.1.mlp.up_proj.weight.*model.norm.weight is F64"):
        convert_from_hf(str(hf_dir), str(out), progress=False)
    _nothing_left(out)


def test_truncated_safetensors(hf_dir, tmp_path):
    shard = hf_dir / "model-00001-of-00001.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    out = tmp_path / "kinoe"
    with pytest.raises(ConversionError, match="truncated"):
        convert_from_hf(str(hf_dir), str(out), progress=False)
    _nothing_left(out)
