"""The generate CLI over the engine: several prompts in one batch, each answered as if alone."""

import shutil

import pytest

from kinoe_jax import generate
from kinoe_jax.inference.loading import load_for_inference
from kinoe_jax.inference.texts import generate_text
from kinoe_jax.models import ModelConfig

CFG = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=64)


def test_several_prompts_in_one_batch(tmp_path, capsys):
    from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
    from kinoe_jax.hf.synthetic import write_random_checkpoint

    write_random_checkpoint(str(tmp_path / "checkpoints"), CFG, step=2, scale=0.3)
    shutil.copyfile(BUILTIN_TOKENIZER, tmp_path / "tokenizer.model")
    prompts = ["今日は", "むかしむかし、あるところに"]
    both = generate.main([f"--workdir={tmp_path}", *[f"--prompt={p}" for p in prompts], "--max_new_tokens=5"])
    printed = capsys.readouterr().out.splitlines()
    assert isinstance(both, list) and len(both) == 2 and all(both)
    cfg, params = load_for_inference(str(tmp_path))
    assert both == [generate_text(cfg, params, p, 5) for p in prompts]
    assert [line for line in printed if line.startswith(tuple(prompts))] == [p + t for p, t in zip(prompts, both)]
    with pytest.raises(SystemExit):
        generate.main([f"--workdir={tmp_path}", "--prompt=今日は", "--top_p=0"])
    assert "top_p 0.0 in (0, 1]" in capsys.readouterr().err
