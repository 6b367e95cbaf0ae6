"""Ahead-of-time fit check of the model presets: compile times and per-device memory.

    python tools/bench/bench_aot.py [--only mistral_7b] [--out runs/bench_aot.json] [--smoke]

Each configuration runs `python -m kinoe_jax.aot` in its own process (the simulated device count
is fixed when JAX starts) and the figures are printed as a markdown table, per-device state next
to its floor, (parameters + optimizer state) / devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name, model preset, mesh gin, devices, seq_len, global_batch, extra bindings
CONFIGS = [
    ("mistral_7b fsdp", "mistral_7b", "fsdp", 8, 4096, 8, []),
    ("kinoe_9b fsdp", "kinoe_9b", "fsdp", 8, 2048, 16, []),
    ("kinoe_9b zero1 (the team's DeepSpeed setting)", "kinoe_9b", "zero1", 8, 2048, 16, []),
    ("mixtral_8x7b fsdp", "mixtral_8x7b", "fsdp", 8, 4096, 8, []),
    ("mixtral_8x7b fsdp", "mixtral_8x7b", "fsdp", 32, 4096, 32, []),
]
# --smoke: one process of the same command on the tiny preset over 2 simulated devices.
SMOKE_CONFIGS = [("tiny_ja fsdp", "tiny_ja", "fsdp", 2, 64, 2, [])]
GIB = 1024 ** 3
RESULT_LINE = r"^\| .+ \| \d+ \| \d+ x \d+ \| \d+ \(\d+\) \| .+ \| (yes|\*\*no\*\*) \| .+ \|$"


def run_one(name, preset, mesh, devices, seq_len, batch, extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fit.json")
        cmd = [sys.executable, "-m", "kinoe_jax.aot", f"--gin_file=gin_configs/models/{preset}.gin",
               f"--gin_file=gin_configs/mesh/{mesh}.gin", f"--num_devices={devices}", f"--seq_len={seq_len}",
               f"--global_batch={batch}", "--accelerator=h100", f"--json_out={out}"]
        cmd += [f"--gin_bindings={b}" for b in extra]
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("XLA_FLAGS", None)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode not in (0, 1) or not os.path.exists(out):
            raise RuntimeError(f"{name}: kinoe_jax.aot failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        print(proc.stdout, flush=True)
        with open(out, encoding="utf-8") as f:
            fig = json.load(f)
    fig.update(name=name, preset=preset, mesh_gin=mesh, process_wall_s=wall)
    return fig


def table(rows: list[dict]) -> str:
    head = ("| configuration | devices | batch x seq | compile s (CPU s) | params / dev GiB | opt state / dev GiB "
            "| floor (params+opt)/dev GiB | temporaries GiB | total / dev GiB | fits 80 GB | FLOPs/step compiled "
            "(formula) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        flops = f"{r['flops_compiled']:.3g} ({r['flops_formula']:.3g})"
        lines.append(
            f"| {r['name']} | {r['num_devices']} | {r['global_batch']} x {r['seq_len']} | "
            f"{r['compile_s']:.0f} ({r['compile_cpu_s']:.0f}) | {r['params_bytes'] / GIB:.2f} | "
            f"{r['opt_state_bytes'] / GIB:.2f} | {r['min_state_bytes'] / GIB:.2f} | {r['temp_bytes'] / GIB:.2f} | "
            f"{r['total_bytes'] / GIB:.2f} | {'yes' if r['fits'] else '**no**'} | {flops} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="run only configurations whose name contains this")
    parser.add_argument("--out", default=None, help="write all figures as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="a toy size, a step or two: shows that the benchmark runs, measures nothing")
    args = parser.parse_args(argv)
    rows = []
    for cfg in SMOKE_CONFIGS if args.smoke else CONFIGS:
        if args.only and args.only not in cfg[0]:
            continue
        rows.append(run_one(*cfg))
    print(table(rows))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, default=str)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
