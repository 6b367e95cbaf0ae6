"""MT-Bench answers: FastChat's question and model_answer formats, both turns in one conversation,
from a kinoe checkpoint and from its HF export (which must answer the same)."""

import json
import os

import pytest

from paths import REPO
from reference_runs import sft_runs
from tools import mt_bench_answers

from kinoe_jax.sft import mt_bench

QUESTIONS = os.path.join(REPO, "kinoe_jax", "data", "builtin", "sft", "mt_bench_ja_questions.jsonl")
ANSWER_KEYS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_builtin_questions_load():
    qs = mt_bench.load_questions(QUESTIONS)
    assert [q["question_id"] for q in qs] == list(range(101, 121))
    assert {q["category"] for q in qs} == set(mt_bench.TEMPERATURE)
    assert all(len(q["turns"]) == 2 for q in qs)


def test_references_cover_the_categories_the_judge_grades_against_them():
    rows, missing = mt_bench.references(mt_bench.load_questions(QUESTIONS), "gpt-4")
    assert missing == []
    assert {r["question_id"] for r in rows} == set(range(107, 114))
    assert all(len(r["choices"][0]["turns"]) == 2 for r in rows)


def test_bad_question_files_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    good = {"question_id": 1, "category": "writing", "turns": ["a", "b"]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "question_id": 2, "turns": ["only one"]}) + "\n")
    with pytest.raises(mt_bench.QuestionError, match=r"q.jsonl:2: .*two non-empty questions"):
        mt_bench.load_questions(str(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(mt_bench.QuestionError, match="q.jsonl:2: question_id 1 also on line 1"):
        mt_bench.load_questions(str(path))


class _Recording:
    """The real chat backend, with the conversations it was asked to continue kept for checking."""

    def __init__(self, chat):
        self.chat, self.calls = chat, []

    def replies(self, conversations, *args):
        self.calls += [[dict(m) for m in messages] for messages in conversations]
        return self.chat.replies(conversations, *args)


@pytest.mark.slow
def test_answers_from_a_checkpoint_and_from_its_hf_export(tmp_path):
    sft = sft_runs()["sft"]
    all_questions = mt_bench.load_questions(QUESTIONS)
    picked = [q for q in all_questions if q["question_id"] == 110]  # math: has a reference
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in picked), encoding="utf-8")
    bench = tmp_path / "kinoe_ja_mt_bench"
    assert mt_bench_answers.main([f"--workdir={sft}", "--model_id=kinoe-test", f"--bench_dir={bench}",
                         f"--question_file={qfile}", "--max_new_tokens=6"]) == 0
    assert _jsonl(bench / "question.jsonl") == picked
    answers = _jsonl(bench / "model_answer" / "kinoe-test.jsonl")
    assert [a["question_id"] for a in answers] == [110]
    assert set(answers[0]) == ANSWER_KEYS and answers[0]["model_id"] == "kinoe-test"
    choices = answers[0]["choices"]
    assert len(choices) == 1 and choices[0]["index"] == 0
    assert len(choices[0]["turns"]) == 2 and all(isinstance(t, str) for t in choices[0]["turns"])
    refs = _jsonl(bench / "reference_answer" / "gpt-4.jsonl")
    assert refs == [{"question_id": 110, "answer_id": "reference-110", "model_id": "gpt-4",
                     "choices": [{"index": 0, "turns": picked[0]["reference"]}], "tstamp": 0.0}]

    # Both turns are one conversation: the second question follows the model's first answer.
    question = [q for q in all_questions if q["category"] == "reasoning"][:1]  # greedy
    kinoe = _Recording(mt_bench.KinoeChat(sft))
    from_kinoe = mt_bench.answer(question, kinoe, "k", max_new_tokens=6, progress=False)
    first_answer = from_kinoe[0]["choices"][0]["turns"][0]
    assert kinoe.calls[1] == [{"role": "user", "content": question[0]["turns"][0]},
                              {"role": "assistant", "content": first_answer},
                              {"role": "user", "content": question[0]["turns"][1]}]

    # The HF export, through transformers' chat template, gives the same prompt ids and the same
    # greedy answers.
    from kinoe_jax.data.vocab import get_vocabulary
    from kinoe_jax.hf.export import convert_to_hf
    from kinoe_jax.data.chat.conversation import prompt_ids

    hf_dir = tmp_path / "hf"
    convert_to_hf(os.path.join(sft, "checkpoints"), str(hf_dir), progress=False, log=lambda *a: None)
    hf = _Recording(mt_bench.HFChat(str(hf_dir)))
    from_hf = mt_bench.answer(question, hf, "h", max_new_tokens=6, progress=False)
    assert hf.chat.prompt_ids(kinoe.calls[1]) == prompt_ids(kinoe.calls[1], get_vocabulary())
    assert [r["choices"] for r in from_hf] == [r["choices"] for r in from_kinoe]
    assert hf.calls == kinoe.calls


@pytest.mark.slow
def test_turns_are_answered_in_batches_as_one_at_a_time(tmp_path):
    """Turn 1 of every question goes in one batch, then every turn 2; each answer is what the
    question gets when asked alone."""
    import shutil

    from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
    from kinoe_jax.hf.synthetic import write_random_checkpoint
    from kinoe_jax.models import ModelConfig

    cfg = ModelConfig(vocab_size=4000, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=160)
    write_random_checkpoint(str(tmp_path / "checkpoints"), cfg, step=1, scale=0.3)
    shutil.copyfile(BUILTIN_TOKENIZER, tmp_path / "tokenizer.model")
    questions = mt_bench.load_questions(QUESTIONS)[:3]
    chat = _Recording(mt_bench.KinoeChat(str(tmp_path)))
    batched = mt_bench.answer(questions, chat, "k", max_new_tokens=4, temperature=0.0, progress=False)
    assert [len(c) for c in chat.calls] == [1, 1, 1, 3, 3, 3]
    assert [c[0]["content"] for c in chat.calls] == [q["turns"][0] for q in questions] * 2
    alone = [mt_bench.answer([q], chat.chat, "k", max_new_tokens=4, temperature=0.0, progress=False)[0]
             for q in questions]
    assert [r["choices"] for r in batched] == [r["choices"] for r in alone]
    assert all(len(r["choices"][0]["turns"]) == 2 for r in batched)
