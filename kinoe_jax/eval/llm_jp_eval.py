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
import dataclasses
import glob
import logging
import os
import sys
import time

from kinoe_jax.config import inputs as cli


def _prompt_files(flag: str, pattern: str) -> list[str]:
    """The dumps a glob or a directory names, each escaped to stay itself when globbed again."""
    return [glob.escape(p) for p in cli.text_files(flag, pattern, (".eval-prompt.json",))]


INPUTS = {"--workdir": cli.directory, "--prompts": _prompt_files}
if __name__ == "__main__":  # a bad path is named before TensorFlow and JAX load
    cli.precheck(INPUTS)

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # the platform settled and accelerators hidden from TensorFlow, before JAX starts

import jax  # noqa: E402

from kinoe_jax import __version__  # noqa: E402
from kinoe_jax.eval import dumps as dumps_lib  # noqa: E402
from kinoe_jax.eval.generation import generate_dataset  # noqa: E402
from kinoe_jax.eval.scoring import log_to_wandb, score_results  # noqa: E402
from kinoe_jax.inference import Engine, PromptTooLong, load_for_inference, use_workdir_tokenizer  # noqa: E402
from kinoe_jax.inference.loading import checkpoint_location  # noqa: E402
from kinoe_jax.models.stored import read_model_config  # noqa: E402
from kinoe_jax.parallel.mesh import make_mesh  # noqa: E402
from kinoe_jax.utils.atomic import atomic_directory  # noqa: E402

log = logging.getLogger("kinoe_jax.eval.llm_jp_eval")


def run_inference(args, dumps: list[tuple[str, dict]]) -> str:
    """Generate for every dump; returns the run directory, written atomically."""
    t0 = time.perf_counter()
    tokenizer = use_workdir_tokenizer(args.workdir)
    mesh = None
    if args.fsdp > 1:
        mesh = make_mesh(data=1, fsdp=args.fsdp, devices=jax.local_devices()[:args.fsdp])
    cfg, params = load_for_inference(args.workdir, args.step, mesh=mesh)
    engine = Engine(cfg, params, mesh, batch_size=args.batch_size, overflow=args.overflow)
    init_seconds = time.perf_counter() - t0
    outputs, profiles, time_profile, truncated = {}, {}, {}, {}
    for path, dump in dumps:
        name = dump["target_dataset"]
        t = time.perf_counter()
        try:
            ids, completions = generate_dataset(engine, dump, args.apply_chat_template)
        except PromptTooLong as e:  # --overflow=error
            raise dumps_lib.DumpError(f"{path}: samples: {e}") from None
        time_profile[name] = time.perf_counter() - t
        outputs[name] = dumps_lib.generated(dump, [c.text for c in completions])
        profiles[name] = _profile([len(x) for x in ids], dumps_lib.max_new_tokens(dump))
        truncated[name] = sum(1 for c in completions if c.truncated)
        log.info("%s: %d samples in %.1f s (%s)", name, len(ids), time_profile[name], os.path.basename(path))
    infer_seconds = time.perf_counter() - t0 - init_seconds
    profiles["(total)"] = _total(profiles)
    checkpoint_dir, _ = checkpoint_location(args.workdir, args.step)
    dump_config = dumps[0][1]["config"]
    for path, dump in dumps[1:]:
        if dump["config"] != dump_config:
            log.warning("inconsistent config: %s differs from %s's", path, dumps[0][0])
    model_name = args.run_name
    benchmark = {"model": model_name, "lib": f"kinoe_jax{__version__}", "gpu": jax.devices()[0].device_kind,
                 "quantize": "", "tp": 1, "pp": 1, "max_len": cfg.max_seq_len, "options": "",
                 "infer": infer_seconds, "init": init_seconds, "infer+init": infer_seconds + init_seconds,
                 "conv": 0.0, "total": infer_seconds + init_seconds}
    config = {
        "run_name": args.run_name, "output_base_dir": os.path.abspath(args.output_dir),
        "prompt_json_path": [args.prompts], "apply_chat_template": args.apply_chat_template,
        "batch_size": args.batch_size, "overflow": args.overflow,
        "model": {"workdir": os.path.abspath(args.workdir), "checkpoint_dir": checkpoint_dir,
                  "step": _step_of(checkpoint_dir, args.step), "model_config": _jsonable(dataclasses.asdict(cfg))},
        "tokenizer": {"path": tokenizer},
        "generation_config": {"do_sample": False, "temperature": 0.0,
                              "max_new_tokens": "output_length + config.output_length_delta of each dataset"},
        "engine": {"compiles": engine.stats["compiles"], "compile_seconds": engine.stats["compile_seconds"],
                   "truncated_prompts": truncated, "truncated_tokens": engine.stats["truncated_tokens"]},
        "inference_result_info": {"dump_prompts_config": dump_config, "dataset_profiles": profiles,
                                  "benchmark": benchmark,
                                  "time_profile": {"(conv)": 0.0, "(init)": init_seconds, "(infer)": infer_seconds,
                                                   **time_profile}},
    }
    final = os.path.join(args.output_dir, args.run_name)
    with atomic_directory(final, overwrite=True) as tmp:
        for name, obj in outputs.items():
            dumps_lib.write_json(os.path.join(tmp, name + dumps_lib.GENERATED_SUFFIX), obj)
        dumps_lib.write_json(os.path.join(tmp, "_config.json"), config)
    if any(truncated.values()):
        log.warning("prompts truncated from the left to fit %d tokens: %s", cfg.max_seq_len,
                    {k: v for k, v in truncated.items() if v})
    return os.path.abspath(final)


def _profile(lengths: list[int], max_output: int) -> dict:
    return {"num_prompt": len(lengths), "max_input_len": max(lengths), "sum_input_len": sum(lengths),
            "max_output_len": max_output, "max_seq_len": max(lengths) + max_output,
            "sum_seq_len": sum(lengths) + max_output * len(lengths)}


def _total(profiles: dict) -> dict:
    p = list(profiles.values())
    return {"num_prompt": sum(x["num_prompt"] for x in p), "max_input_len": max(x["max_input_len"] for x in p),
            "sum_input_len": sum(x["sum_input_len"] for x in p), "max_output_len": max(x["max_output_len"] for x in p),
            "max_seq_len": max(x["max_seq_len"] for x in p), "sum_seq_len": sum(x["sum_seq_len"] for x in p)}


def _step_of(checkpoint_dir: str, step):
    return read_model_config(checkpoint_dir, step)[0]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def score(run_dir: str, run_name: str, wandb_project: str | None) -> dict:
    scores, rows = score_results(dumps_lib.load_generated(run_dir))
    dumps_lib.write_json(os.path.join(run_dir, "scores.json"), scores)
    if wandb_project:
        log_to_wandb(run_dir, run_name, scores, rows, project=wandb_project)
    return scores


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1 or args.fsdp < 1:
        parser.error("--batch_size and --fsdp must be >= 1")
    run_dir = os.path.join(args.output_dir, args.run_name)
    try:
        if args.workdir:
            cli.directory("--workdir", args.workdir)
            run_dir = run_inference(args, dumps_lib.load_dumps(_prompt_files("--prompts", args.prompts)))
            print(f"wrote {run_dir}")
        elif not args.score:
            parser.error("give --workdir to generate, or --score to score an existing run directory")
        if args.score:
            scores = score(run_dir, args.run_name, args.wandb_project)
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
