"""llm-jp-eval offline: generate for every prompt dump into a run directory (written whole or
not at all), and score a run directory. `python -m kinoe_jax.eval.llm_jp_eval` is the command."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax

from kinoe_jax import __version__
from kinoe_jax.eval import dumps as dumps_lib
from kinoe_jax.eval.generation import generate_dataset
from kinoe_jax.eval.scoring import log_to_wandb, score_results
from kinoe_jax.inference import Engine, PromptTooLong, load_for_inference, use_workdir_tokenizer
from kinoe_jax.inference.loading import checkpoint_location
from kinoe_jax.models.stored import read_model_config
from kinoe_jax.parallel.mesh import make_mesh
from kinoe_jax.utils.atomic import atomic_directory

log = logging.getLogger(__name__)


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
