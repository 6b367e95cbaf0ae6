"""Answer MT-Bench-style questions and lay them out for FastChat's LLM judge.

    # from a kinoe run (workdir, its checkpoints/ dir, or one step's directory)
    python tools/mt_bench_answers.py --workdir=runs/dpo_tiny_ja --model_id=kinoe-tiny-dpo \
        --bench_dir=FastChat/fastchat/llm_judge/data/kinoe_ja_mt_bench
    # from an exported Hugging Face directory (tools/convert_to_hf.py)
    python tools/mt_bench_answers.py --hf_dir=hf/kinoe-tiny --model_id=kinoe-tiny-hf --bench_dir=...

Reads a FastChat question file (default: the built-in 20 Japanese questions) and writes into
--bench_dir:
  question.jsonl                       the questions (FastChat reads them from here)
  model_answer/<model_id>.jsonl        the answers, both turns in one conversation
  reference_answer/<judge_model>.jsonl the questions' "reference" answers, for the judge
Sampling follows FastChat: temperature 0.7 for writing/roleplay, 0.1 for stem/humanities, greedy
for the rest (--temperature overrides it). A kinoe checkpoint answers turn 1 of every question in
batches, then turn 2. Then, in FastChat/fastchat/llm_judge:
    python gen_judgment.py --bench-name kinoe_ja_mt_bench --model-list <model_id> --judge-model gpt-4
"""

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import kinoe_jax  # noqa: F401
except ModuleNotFoundError:
    # Running from a source checkout without the package installed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUILTIN_QUESTIONS = (Path(__file__).resolve().parents[1] / "kinoe_jax" / "data" / "builtin" / "sft"
                     / "mt_bench_ja_questions.jsonl")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a kinoe run's workdir (latest checkpoint)")
    src.add_argument("--checkpoint", help="a checkpoints/ directory or one step's directory")
    src.add_argument("--hf_dir", help="an exported Hugging Face model directory")
    parser.add_argument("--step", type=int, default=None, help="with --workdir/--checkpoint: which step")
    parser.add_argument("--model_id", required=True, help="the name the judge and the results use")
    parser.add_argument("--bench_dir", required=True,
                        help="FastChat's data/<bench-name> directory (created if missing)")
    parser.add_argument("--question_file", default=str(BUILTIN_QUESTIONS))
    parser.add_argument("--judge_model", default="gpt-4", help="names the reference answer file")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=None, help="default: FastChat's per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="with --hf_dir: torch dtype to run in")
    parser.add_argument("--first_n", type=int, default=None, help="answer only the first N questions")
    parser.add_argument("--batch_size", type=int, default=16, help="with --workdir/--checkpoint: questions per batch")
    args = parser.parse_args(argv)

    from kinoe_jax.config import inputs as cli

    source_flag = "--hf_dir" if args.hf_dir else "--workdir" if args.workdir else "--checkpoint"
    source = args.hf_dir or args.workdir or args.checkpoint
    with cli.reported(parser):  # before the model code loads
        cli.text_file("--question_file", args.question_file)
        cli.directory(source_flag, source)

    from kinoe_jax.sft import mt_bench

    with cli.reported(parser, mt_bench.QuestionError):
        questions = mt_bench.load_questions(args.question_file)
    if args.first_n:
        questions = questions[: args.first_n]
    # The model loads before anything is written: a directory holding no checkpoint leaves no bench_dir.
    with cli.reported(parser, FileNotFoundError):
        chat = (mt_bench.HFChat(args.hf_dir, args.dtype) if args.hf_dir
                else mt_bench.KinoeChat(source, args.step, batch_size=args.batch_size))

    bench = Path(args.bench_dir)
    bench.mkdir(parents=True, exist_ok=True)
    question_out = bench / "question.jsonl"
    text = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    if question_out.exists() and question_out.read_text(encoding="utf-8") != text:
        cli.fail(parser, f"--bench_dir={args.bench_dir}: {question_out} holds other questions; use another --bench_dir")
    question_out.with_suffix(".tmp").write_text(text, encoding="utf-8")
    os.replace(question_out.with_suffix(".tmp"), question_out)
    refs, missing = mt_bench.references(questions, args.judge_model)
    if refs:
        mt_bench.write_jsonl(str(bench / "reference_answer" / f"{args.judge_model}.jsonl"), refs)
    if missing:
        print(f"warning: questions {missing} have no reference; FastChat's judge needs one for their "
              f"categories (add a \"reference\" to them)", file=sys.stderr)

    rows = mt_bench.answer(questions, chat, args.model_id, args.max_new_tokens, args.temperature, args.seed)
    out = bench / "model_answer" / f"{args.model_id}.jsonl"
    mt_bench.write_jsonl(str(out), rows)
    print(f"wrote {len(rows)} answers to {out}")
    print(f"next, in FastChat/fastchat/llm_judge:\n  python gen_judgment.py --bench-name {bench.name} "
          f"--model-list {args.model_id} --judge-model {args.judge_model} --parallel 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
