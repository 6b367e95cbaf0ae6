"""llm-jp-eval's formats and metrics: the scoring rules by hand, bad dumps refused by file and
field with nothing written, and the CLI end to end on a checkpoint (generation, _config.json,
offline scoring, the W&B sample table)."""

import glob
import json
import os
import shutil

import pytest

from kinoe_jax.eval import dumps, metrics
from kinoe_jax.eval.llm_jp_eval import main

DUMP = {"target_dataset": "toy", "output_length": 3, "metrics": ["exact_match", "char_f1"],
        "config": {"output_length_delta": 2}, "instruction": "答えてください。",
        "samples": [{"prompt": "### 入力\n一足す一は\n### 答え\n", "gold": "二", "input": "一足す一は"},
                    {"prompt": "### 入力\n空の色は\n### 答え\n", "gold": "青", "system_prompt": "短く答えます。"}]}


def test_scoring_rules():
    assert metrics.normalize_prediction('  "ＡＢＣ１２"\n\n次の段落') == "ABC12"
    assert metrics.normalize_prediction("一行目\n二行目\n\n次の段落") == "一行目\n二行目"
    assert metrics.normalize_gold(" ４２ ") == "42"
    assert metrics.exact_match("東京", "東京") == 1.0 and metrics.exact_match("東京", "東京都") == 0.0
    assert metrics.exact_match_figure("12.0", "12") == 1.0
    assert metrics.exact_match_figure("十二", "12") == 0.0 and metrics.exact_match_figure("13", "12") == 0.0
    assert metrics.char_f1("大阪 東京", "東京 大阪") == 1.0  # token_sort_ratio sorts the words
    assert metrics.char_f1("りんご", "りんごジュース") == pytest.approx(0.6)  # 2*3 / (3+7)
    assert metrics.set_f1("a\nb\n b", "b\nc") == pytest.approx(0.5)
    assert metrics.set_f1("x", "b\nc") == 0.0
    assert metrics.bleu_ja("今日は晴れです。", "今日は晴れです。") == pytest.approx(1.0)
    assert 0.0 < metrics.bleu_ja("今日は雨です。", "今日は晴れです。") < 1.0 and metrics.bleu_ja("", "晴れ") == 0.0
    scores, per_sample, skipped = metrics.score_dataset(
        ["1", "2\n\n余談", "ほぼ3", "4"], ["1", "2", "3", "5"],
        ["exact_match", "pearson", "spearman", "comet_wmt22"])
    assert scores["exact_match"] == 0.5 and [s["exact_match"] for s in per_sample] == [1, 1, 0, 0]
    assert scores["pearson"] == pytest.approx(0.9827076298239908)  # numbers kept from "ほぼ3": 3
    assert scores["spearman"] == pytest.approx(1.0) and skipped == ["comet_wmt22"]


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("output_length"), "toy.eval-prompt.json: output_length: missing field"),
    (lambda d: d["metrics"].append("rouge_ja"), "toy.eval-prompt.json: metrics\\[2\\]: unknown metric 'rouge_ja'"),
    (lambda d: d.update(samples=[]), "toy.eval-prompt.json: samples: empty"),
    (lambda d: d["samples"][1].pop("gold"), "toy.eval-prompt.json: samples\\[1\\].gold: missing field"),
    (lambda d: d["samples"][0].update(choices=["一", "三"]), "samples\\[0\\].choices: gold '二' is not one of them"),
    (lambda d: d["config"].update(output_length_delta="2"), "config.output_length_delta: must be an int"),
])
def test_bad_dumps_are_refused_by_file_and_field_and_nothing_is_written(tmp_path, capsys, edit, message):
    bad = json.loads(json.dumps(DUMP))
    edit(bad)
    (tmp_path / "toy.eval-prompt.json").write_text(json.dumps(bad, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(dumps.DumpError, match=message):
        dumps.load_dumps(str(tmp_path / "*.eval-prompt.json"))
    out = tmp_path / "out"
    assert main([f"--workdir={tmp_path}", f"--prompts={tmp_path}/*.eval-prompt.json", f"--output_dir={out}",
                 "--run_name=r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and "toy.eval-prompt.json" in err[0]
    assert not out.exists()


def test_the_builtin_set():
    found = dumps.load_dumps(dumps.BUILTIN)
    assert len(found) >= 6 and all(len(d["samples"]) >= 20 for _, d in found)
    by_metric = {m: [d for _, d in found if m in d["metrics"]] for m in metrics.PER_SAMPLE}
    for kind in ("exact_match", "char_f1", "exact_match_figure", "set_f1", "bleu_ja"):
        assert by_metric[kind], kind
    choice_sets = [d for _, d in found if all("choices" in s for s in d["samples"])]
    assert len(choice_sets) >= 3  # commonsense, NLI labels, word knowledge
    inputs = set()
    for path, d in found:
        assert os.path.basename(path) == d["target_dataset"] + ".eval-prompt.json"
        for s in d["samples"]:
            # Every prompt is the dump's template; it ends at a line break, so a continuation
            # tokenizes the same alone as after the prompt.
            assert s["prompt"] == d["prompt_template"].format(instruction=d["instruction"], input=s["input"])
            assert s["prompt"].endswith("\n") and s["input"] not in inputs
            inputs.add(s["input"])
    labels = next(d for _, d in found if d["label_list"])
    assert {s["gold"] for s in labels["samples"]} == set(labels["label_list"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
    from kinoe_jax.hf.synthetic import write_random_checkpoint
    from kinoe_jax.models import ModelConfig

    work = tmp_path_factory.mktemp("llm_jp_eval") / "run"
    cfg = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=48)
    write_random_checkpoint(str(work / "checkpoints"), cfg, step=3)
    shutil.copyfile(BUILTIN_TOKENIZER, work / "tokenizer.model")
    return work


def test_cli_writes_the_inference_layout_and_scores_it_offline(checkpoint, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "toy.eval-prompt.json").write_text(json.dumps(DUMP, ensure_ascii=False), encoding="utf-8")
    arith = json.loads(open(os.path.join(dumps.BUILTIN_DIR, "kinoe_arith.eval-prompt.json"), encoding="utf-8").read())
    (prompts / "arith.eval-prompt.json").write_text(json.dumps(arith, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "outputs"
    args = [f"--workdir={checkpoint}", f"--prompts={prompts}/*.eval-prompt.json", f"--output_dir={out}",
            "--run_name=kinoe-test", "--batch_size=8"]
    assert main(args + ["--apply_chat_template"]) == 0
    run = out / "kinoe-test"
    assert sorted(os.listdir(run)) == ["_config.json", "kinoe_arith.eval-generated.json", "toy.eval-generated.json"]
    toy = json.loads((run / "toy.eval-generated.json").read_text(encoding="utf-8"))
    assert {k: v for k, v in toy.items() if k != "samples"} == {k: v for k, v in DUMP.items() if k != "samples"}
    assert [{k: v for k, v in s.items() if k != "generated"} for s in toy["samples"]] == DUMP["samples"]
    assert all(isinstance(s["generated"], str) for s in toy["samples"])

    # The generations are the engine's greedy answers to the chat-templated prompts, with
    # output_length + output_length_delta new tokens at most.
    from kinoe_jax.data.vocab import get_vocabulary
    from kinoe_jax.eval.generation import prompt_ids
    from kinoe_jax.inference import Engine, load_for_inference

    cfg, params = load_for_inference(str(checkpoint))
    vocab = get_vocabulary()
    ids = [prompt_ids(s, vocab, chat_template=True) for s in DUMP["samples"]]
    assert ids[1][:3] == [3, vocab.tokenizer.piece_to_id("<|system|>"), 4]
    want = Engine(cfg, params).generate(ids, 5)
    assert [s["generated"] for s in toy["samples"]] == [c.text for c in want]
    assert all(len(c.ids) <= 5 for c in want)

    config = json.loads((run / "_config.json").read_text(encoding="utf-8"))
    info = config["inference_result_info"]
    assert set(info) == {"dump_prompts_config", "dataset_profiles", "benchmark", "time_profile"}
    assert info["dataset_profiles"]["toy"] == {
        "num_prompt": 2, "max_input_len": max(map(len, ids)), "sum_input_len": sum(map(len, ids)),
        "max_output_len": 5, "max_seq_len": max(map(len, ids)) + 5, "sum_seq_len": sum(map(len, ids)) + 10}
    assert info["dataset_profiles"]["(total)"]["num_prompt"] == 2 + len(arith["samples"])
    assert config["model"]["step"] == 3 and config["apply_chat_template"] is True
    # Arithmetic prompts are longer than this model's 48-token context: counted, not hidden.
    assert config["engine"]["truncated_prompts"]["kinoe_arith"] == len(arith["samples"])

    # Refusing long prompts instead leaves the earlier run as it was.
    before = (run / "toy.eval-generated.json").read_bytes()
    assert main(args + ["--overflow=error"]) == 2
    assert "arith.eval-prompt.json: samples: generate: request" in capsys.readouterr().err
    assert (run / "toy.eval-generated.json").read_bytes() == before

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([f"--output_dir={out}", "--run_name=kinoe-test", "--score"]) == 0
    scores = json.loads((run / "scores.json").read_text(encoding="utf-8"))
    assert set(scores["datasets"]) == {"toy", "kinoe_arith"}
    assert set(scores["datasets"]["toy"]) == {"exact_match", "char_f1"}
    assert scores["num_samples"] == {"toy": 2, "kinoe_arith": len(arith["samples"])}
    assert scores["average"] == pytest.approx(sum(scores["dataset_average"].values()) / 2)
    tables = glob.glob(str(run / "wandb" / "offline-run-*" / "files" / "media" / "table" / "**" / "*.table.json"),
                       recursive=True)
    assert len(tables) == 1
    table = json.loads(open(tables[0], encoding="utf-8").read())
    assert table["columns"] == ["dataset", "index", "prompt", "gold", "generated", "score", "scores"]
    assert len(table["data"]) == 2 + len(arith["samples"])
    assert table["data"][-1][:5] == ["toy", 1, DUMP["samples"][1]["prompt"], "青", toy["samples"][1]["generated"]]
