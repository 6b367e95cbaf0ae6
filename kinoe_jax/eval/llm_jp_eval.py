"""llm-jp-eval offline inference (and scoring) from a kinoe checkpoint.

    python -m kinoe_jax.eval.llm_jp_eval --workdir=runs/tiny_ja \\
        --prompts='dataset/1.4.1/evaluation/test/prompts/*.eval-prompt.json' \\
        --output_dir=outputs --run_name=kinoe-tiny [--apply_chat_template] [--batch_size=16] [--score]
    # score generations already written (no model needed)
    python -m kinoe_jax.eval.llm_jp_eval --output_dir=outputs --run_name=kinoe-tiny --score

Writes <output_dir>/<run_name>/<target_dataset>.eval-generated.json for every dump and
_config.json beside them, the layout llm-jp-eval's evaluator reads (`inference_result_dir`);
the directory appears whole or not at all. Decoding is greedy, max new tokens per dataset is
output_length + config.output_length_delta, and generation stops at EOS (or <|end|>).
--prompts defaults to the built-in set (kinoe_jax/data/builtin/eval/). A prompt longer than the
model's context is truncated from the left (its BOS kept), counted per dataset in _config.json
and warned about; --overflow=error refuses it instead.

--score adds scores.json (per dataset and averaged over all; metrics that need something this
tool does not run, such as COMET or code execution, are listed as skipped) and logs the scores
and a table of samples (prompt, gold, generated, score) to a W&B run, offline unless WANDB_MODE
says otherwise.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys

from kinoe_jax.config import inputs as cli
from kinoe_jax.eval import dumps as dumps_lib


def _prompt_files(flag: str, pattern: str) -> list[str]:
    """The dumps a glob or a directory names, each escaped to stay itself when globbed again."""
    return [glob.escape(p) for p in cli.text_files(flag, pattern, (".eval-prompt.json",))]


INPUTS = {"--workdir": cli.directory, "--prompts": _prompt_files}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="a training workdir, its checkpoints/ dir, or one step's directory")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompts", default=dumps_lib.BUILTIN, help="glob or directory of *.eval-prompt.json "
                        "dumps (default: the built-in set)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--run_name", required=True)
    parser.add_argument("--apply_chat_template", action="store_true",
                        help="prompt = system (if any) + user through the chat template, with the assistant header")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--overflow", choices=("truncate_left", "error"), default="truncate_left",
                        help="what a prompt longer than the context gets")
    parser.add_argument("--fsdp", type=int, default=1, help="shard the parameters over this many local devices")
    parser.add_argument("--score", action="store_true", help="also score the generations (scores.json, W&B)")
    parser.add_argument("--wandb_project", default="kinoe_jax", help="'' to skip W&B")
    cli.precheck(INPUTS, argv)  # a bad path is named before TensorFlow and JAX load
    args = parser.parse_args(argv)
    from kinoe_jax.hardware import runtime

    runtime.setup()  # the platform settled and accelerators hidden from TensorFlow, before JAX starts
    from kinoe_jax.eval import offline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1 or args.fsdp < 1:
        parser.error("--batch_size and --fsdp must be >= 1")
    run_dir = os.path.join(args.output_dir, args.run_name)
    try:
        if args.workdir:
            cli.directory("--workdir", args.workdir)
            run_dir = offline.run_inference(args, dumps_lib.load_dumps(_prompt_files("--prompts", args.prompts)))
            print(f"wrote {run_dir}")
        elif not args.score:
            parser.error("give --workdir to generate, or --score to score an existing run directory")
        if args.score:
            scores = offline.score(run_dir, args.run_name, args.wandb_project)
            for name, values in scores["datasets"].items():
                print(f"{name}: " + ", ".join(f"{m} {v:.4f}" for m, v in values.items()))
            for name, skipped in scores["skipped"].items():
                print(f"{name}: skipped {', '.join(f'{m} ({why})' for m, why in skipped.items())}")
            if scores["average"] is not None:
                print(f"average: {scores['average']:.4f}")
    except (cli.InputError, dumps_lib.DumpError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
