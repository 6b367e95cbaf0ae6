"""Is the input pipeline ever what the training step waits for?

    python tools/bench/bench_input_pipeline.py [--batches=200] [--train_steps=40] [--chip=h100] [--mfu=0.4]
                                               [--devices_per_host=8] [--seq_len_7b=2048] [--smoke]

In one process, side by side:
  1. what the tiny main job (gin_configs/runs/tiny_ja.gin) consumes: tokens/s of its real training
     loop on this machine, from its own metrics (the first logged interval, which compiles, is left out);
  2. what a 7B-shaped step consumes per host: devices_per_host x chip peak x MFU / FLOPs per token,
     FLOPs per token from gin_configs/models/mistral_7b.gin (6N + attention, ModelConfig.flops_per_token);
  3. what the input pipeline delivers: packed [batch, seq_len] tokens/s of both phases of the tiny
     run's schedule (the corpus; the corpus plus the SFT conversations), at the tiny run's shape and
     at the 7B sequence length. Tokens count every slot the step consumes (padding included); the
     non-padding share is printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import gin  # noqa: E402
import numpy as np  # noqa: E402

from kinoe_jax.training import loop as train_lib  # noqa: E402
from kinoe_jax.config.gin_io import load_gin  # noqa: E402
from kinoe_jax.data import phases, pipeline, sources  # noqa: E402
from kinoe_jax.training.metrics_writer import PEAK_FLOPS, read_metrics  # noqa: E402
from kinoe_jax.models import ModelConfig  # noqa: E402

TINY_RUN = os.path.join(REPO, "gin_configs", "runs", "tiny_ja.gin")
MODEL_7B = os.path.join(REPO, "gin_configs", "models", "mistral_7b.gin")
RESULT_LINE = r"^tiny main job consumes [0-9,]+ tokens/s on this machine$"


def tiny_step_consumption(steps: int, log_every: int = 10) -> float:
    """Tokens/s of the tiny main job's own loop (median of its logged intervals after the first)."""
    with tempfile.TemporaryDirectory() as work:
        gin.clear_config()
        load_gin([TINY_RUN], [f"train.total_steps = {steps}", f"train.log_every = {log_every}", "train.eval_every = 0",
                              "train.sample_prompt = ''", "MetricsWriter.use_wandb = False",
                              "MetricsWriter.progress = False", f"CheckpointConfig.save_every = {steps * 10}"])
        train_lib.train(work)
        rows = read_metrics(work)
    gin.clear_config()
    rates = [r["tokens_per_sec"] for r in rows[1:]]
    if not rates:
        raise SystemExit(f"--train_steps={steps} is too few: need at least {2 * log_every} to leave out compilation")
    return statistics.median(rates)


def consumption_7b(chip: str, mfu: float, devices: int, seq_len: int) -> tuple[float, float, float]:
    gin.clear_config()
    load_gin([MODEL_7B])
    cfg = ModelConfig()
    gin.clear_config()
    flops = cfg.flops_per_token(seq_len)
    return devices * PEAK_FLOPS[chip] * mfu / flops, flops, cfg.num_params(include_embeddings=False)


def pipeline_rate(data: pipeline.DataConfig, mixture: str, seed: int, batches: int) -> tuple[float, float]:
    """(tokens/s, non-padding share) of one phase's packed batches, after a warm-up."""
    cfg = dataclasses.replace(data, mixture=mixture, seed=seed)
    it = iter(pipeline.train_dataset(cfg))
    for _ in range(10):  # fill the shuffle buffers and the prefetch before timing
        next(it)
    real = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        real += int(np.count_nonzero(np.asarray(batch["decoder_loss_weights"])))
    elapsed = time.perf_counter() - start
    slots = batches * cfg.global_batch * cfg.seq_len
    return slots / elapsed, real / slots


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per pipeline measurement")
    parser.add_argument("--train_steps", type=int, default=40, help="steps of the tiny run to time")
    parser.add_argument("--chip", default="h100", choices=sorted(PEAK_FLOPS), help="accelerator of the 7B host")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of the 7B step")
    parser.add_argument("--devices_per_host", type=int, default=8)
    parser.add_argument("--seq_len_7b", type=int, default=2048)
    parser.add_argument("--rows_7b", type=int, default=8, help="rows per batch at the 7B sequence length")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="a toy size, a step or two: shows that the benchmark runs, measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.train_steps, args.seq_len_7b, args.rows_7b = 3, 3, 256, 2

    tiny_need = tiny_step_consumption(args.train_steps, log_every=1 if args.smoke else 10)
    need_7b, flops_7b, n_7b = consumption_7b(args.chip, args.mfu, args.devices_per_host, args.seq_len_7b)

    gin.clear_config()
    load_gin([TINY_RUN])
    sources.register_data()
    tiny = pipeline.DataConfig()
    schedule = phases.PhaseSchedule()
    mixtures = [tiny.mixture, schedule.decay_mixture]
    big = dataclasses.replace(tiny, seq_len=args.seq_len_7b, global_batch=args.rows_7b)
    results = {"tiny_step_tokens_per_s": tiny_need, "7b_step_tokens_per_s_per_host": need_7b,
               "7b_flops_per_token": flops_7b, "7b_non_embedding_params": n_7b, "pipeline": []}
    for shape_name, cfg in (("tiny", tiny), ("7b", big)):
        for phase, mixture in enumerate(mixtures):
            rate, share = pipeline_rate(cfg, mixture, cfg.seed + phase, args.batches)
            need = tiny_need if shape_name == "tiny" else need_7b
            results["pipeline"].append({"shape": f"{cfg.global_batch}x{cfg.seq_len}", "phase": phase,
                                        "mixture": mixture, "tokens_per_s": rate, "non_padding": share,
                                        "vs": shape_name, "ratio": rate / need})

    print(f"tiny main job consumes {tiny_need:,.0f} tokens/s on this machine")
    print(f"7B-shaped step ({n_7b / 1e9:.2f}B non-embedding params, {flops_7b:.3g} FLOPs/token at T={args.seq_len_7b}) "
          f"consumes {need_7b:,.0f} tokens/s per host ({args.devices_per_host} x {args.chip} at {args.mfu:.0%} MFU)")
    print(f"{'batch':>10} {'phase':>5} {'mixture':<26} {'pipeline tok/s':>15} {'non-pad':>8} {'vs step':>8} {'ratio':>8}")
    for r in results["pipeline"]:
        print(f"{r['shape']:>10} {r['phase']:>5} {r['mixture']:<26} {r['tokens_per_s']:>15,.0f} "
              f"{r['non_padding']:>8.1%} {r['vs']:>8} {r['ratio']:>7.1f}x")
    if args.json:
        with open(args.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return results


if __name__ == "__main__":
    main()
