"""tools/train_tokenizer.py: samples JSONL or any seqio task/mixture, reports held-out quality,
and documents its options from the one table in kinoe_jax/data/tokenizer_options.py."""

import json
import os

import pytest
import sentencepiece as spm

from paths import REPO
from tools import train_tokenizer

from kinoe_jax.data.vocab import BOS_ID, BUILTIN_TOKENIZER, CHAT_SYMBOLS, EOS_ID, PAD_ID, UNK_ID


def _check_model(path):
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD_ID, EOS_ID, UNK_ID, BOS_ID)
    for symbol in CHAT_SYMBOLS:
        assert len(sp.encode(symbol)) == 1, symbol


def test_docs_table_is_generated_from_the_options():
    tool = train_tokenizer
    with open(os.path.join(REPO, "docs", "tokenizer.md"), encoding="utf-8") as f:
        doc = f.read()
    table = doc.split(tool.TABLE_START, 1)[1].split(tool.TABLE_END, 1)[0]
    assert table == tool.options_table(), "run: python tools/train_tokenizer.py --write_options_table=docs/tokenizer.md"
    assert all(f"`{name}`" in table for name, _, _ in tool.OPTIONS)


def test_train_on_a_seqio_mixture_and_evaluate_held_out(tmp_path, capsys):
    tool = train_tokenizer
    out = tmp_path / "tok"
    before = os.path.getmtime(BUILTIN_TOKENIZER)
    report = tool.main(["--gin_file=gin_configs/data/builtin_sft_decay.gin", "--task=kinoe_ja_builtin_decay",
                        "--sample_docs=120", "--eval_task=kinoe_ja_builtin", "--vocab_size=2600",
                        f"--output={out}"])
    _check_model(f"{out}.model")
    assert os.path.getmtime(BUILTIN_TOKENIZER) == before  # the built-in model is left alone
    printed = capsys.readouterr().out
    assert "on 120 documents of task kinoe_ja_builtin_decay:train" in printed
    for key in ("chars_per_token", "byte_fallback_rate", "unk_rate", "exact_round_trip"):
        assert key in printed
    assert "kinoe_ja.model" in printed  # the built-in model, side by side on the same text
    assert report["documents"] == 8 and report["chars_per_token"] > 1.0
    assert report["unk_rate"] == 0.0 and report["round_trip_modulo_nfkc"] == 1.0


def test_jsonl_sample_is_uniform_and_bounded(tmp_path):
    tool = train_tokenizer
    kept = tool.sample(iter(range(10_000)), 500, seed=1)
    assert len(kept) == 500 and len(set(kept)) == 500
    assert 3500 < sum(kept) / 500 < 6500  # spread over the whole stream, not its head
    assert tool.sample(iter(range(5)), 0, seed=1) == [0, 1, 2, 3, 4]


def test_task_needs_a_sample_size(tmp_path):
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--task=kinoe_ja_builtin", f"--output={tmp_path / 'x'}"])


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "よい行"}, ensure_ascii=False) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"{path}:2"):
        train_tokenizer.main([f"--input={path}", f"--output={tmp_path / 'x'}"])
