"""MT-Bench answers in FastChat's formats (the logic of tools/mt_bench_answers.py).

FastChat's llm_judge reads, under data/<bench>/:
  question.jsonl                   {"question_id", "category", "turns": [q1, q2], ...}
  model_answer/<model_id>.jsonl    {"question_id", "answer_id", "model_id",
                                    "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}
  reference_answer/<judge>.jsonl   the same format; the judge grades math, reasoning and coding
                                   against it
Both turns of a question are one conversation: the second question is asked after the model's
own first answer, through the chat template the model was tuned with.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from tqdm import tqdm

from kinoe_jax.data.chat.conversation import BadExample
from kinoe_jax.data.chat.report import read_lines
from kinoe_jax.inference import Engine, load_for_inference, use_workdir_tokenizer
from kinoe_jax.inference.texts import generate_chats
from kinoe_jax.sft.validate import NEEDS_REFERENCE, check_mt_bench
from kinoe_jax.utils import atomic

# FastChat's sampling temperature per category (fastchat/llm_judge/common.py).
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
               "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


class QuestionError(ValueError):
    pass


def load_questions(path: str) -> list[dict]:
    questions, seen = [], {}
    for line_no, text in read_lines(path):
        try:
            if isinstance(text, BadExample):
                raise text
            q = json.loads(text)
            if not isinstance(q, dict):
                raise BadExample("mt_bench_schema", "not a JSON object")
            check_mt_bench(q)
        except ValueError as e:  # BadExample and JSON errors alike
            raise QuestionError(f"{path}:{line_no}: {e}") from None
        if q["question_id"] in seen:
            raise QuestionError(f"{path}:{line_no}: question_id {q['question_id']} also on line {seen[q['question_id']]}")
        seen[q["question_id"]] = line_no
        questions.append(q)
    if not questions:
        raise QuestionError(f"{path}: no questions")
    return questions


class KinoeChat:
    """Replies from a kinoe checkpoint through the batched engine (stops at <|end|>)."""

    def __init__(self, path: str, step: int | None = None, batch_size: int = 16):
        use_workdir_tokenizer(path)
        self.cfg, self.params = load_for_inference(path, step)
        self.engine = Engine(self.cfg, self.params, batch_size=batch_size)

    def replies(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        return generate_chats(self.cfg, self.params, conversations, max_new_tokens, engine=self.engine,
                              temperature=temperature, seed=seed)


class HFChat:
    """Replies from an exported HF directory: transformers' apply_chat_template and generate."""

    def __init__(self, hf_dir: str, dtype: str = "float32"):
        # optional: the hf extra
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(hf_dir)
        if not self.tok.chat_template:
            raise ValueError(f"{hf_dir}: the tokenizer has no chat_template (export it with tools/convert_to_hf.py)")
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
        end = self.tok.convert_tokens_to_ids("<|end|>")
        self.stop_ids = [i for i in (end, self.tok.eos_token_id) if i is not None and i != self.tok.unk_token_id]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def replies(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        return [self.reply(m, max_new_tokens, temperature, seed) for m in conversations]

    def reply(self, messages: list[dict], max_new_tokens: int, temperature: float, seed: int) -> str:
        torch = self.torch
        ids = self.prompt_ids(messages)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.tok.pad_token_id, **sampling)
        new = out[0, len(ids):].tolist()
        for i, t in enumerate(new):
            if t in self.stop_ids:
                new = new[:i]
                break
        return self.tok.decode(new, skip_special_tokens=True)


def answer(questions: list[dict], chat, model_id: str, max_new_tokens: int = 512,
           temperature: float | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """One FastChat model_answer row per question (temperature None: FastChat's per category).

    Turn 1 of every question is answered in batches (one per temperature), then turn 2, each
    second question asked after the model's own first answer."""
    temps = [TEMPERATURE.get(q["category"], 0.7) if temperature is None else temperature for q in questions]
    groups = [[i for i, t in enumerate(temps) if t == temp] for temp in sorted(set(temps))]
    conversations: list[list[dict]] = [[] for _ in questions]
    steps = [(turn, group) for turn in range(2) for group in groups]
    if progress:
        steps = tqdm(steps, desc="MT-Bench", unit="batch")
    for turn, group in steps:
        for i in group:
            conversations[i].append({"role": "user", "content": questions[i]["turns"][turn]})
        replies = chat.replies([conversations[i] for i in group], max_new_tokens, temps[group[0]], seed)
        for i, reply in zip(group, replies):
            conversations[i].append({"role": "assistant", "content": reply.strip()})
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": [m["content"] for m in conv if m["role"] == "assistant"]}],
             "tstamp": time.time()} for q, conv in zip(questions, conversations)]


def references(questions: list[dict], judge_model: str) -> tuple[list[dict], list[int]]:
    """Reference answers from the questions' "reference" fields, and the ids of questions that
    FastChat's judge will want a reference for but have none."""
    rows, missing = [], []
    for q in questions:
        if "reference" in q:
            rows.append({"question_id": q["question_id"], "answer_id": f"reference-{q['question_id']}",
                         "model_id": judge_model, "choices": [{"index": 0, "turns": list(q["reference"])}],
                         "tstamp": 0.0})
        elif q["category"] in NEEDS_REFERENCE:
            missing.append(q["question_id"])
    return rows, missing


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Rows sorted by question_id, one JSON object a line; the file appears whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ordered = sorted(rows, key=lambda r: r["question_id"])
    atomic.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ordered))
