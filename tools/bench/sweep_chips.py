"""The table that chooses the presets' defaults: models x sequence x slice x remat x attention x
batch, each compiled by the chip's own compiler (python -m kinoe_jax.aot --target=...).

    python tools/bench/sweep_chips.py --out runs/sweep_chips.json [--only mistral_7b] [--table]
    python tools/bench/sweep_chips.py --smoke   # one tiny row, compiled by libtpu, kept nowhere

Every configuration is one `kinoe_jax.aot` process (a compile frees its memory when the process
ends); results are appended to --out as they come (rewritten atomically), and a rerun skips the
configurations already there, so an interrupted sweep loses nothing. `--table` prints the
markdown table of what --out holds. Layers are scanned, so a full-depth compile costs about what
a two-layer one does: every row is the real depth, nothing is extrapolated.

The plan below is pruned by hand, from rows already measured: the blocked attention is compiled
once per platform (it never beats the chip kernels), remat "none" once (it cannot hold 7B-class
activations at these lengths), and each remat policy is tried at the batches around where it
stops fitting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 1024 ** 3

# (model preset, seq_len, target, remat, attention, sequences per device[, matmul_dtype])
PLAN = [
    # The goals first: mistral_7b at 4096 on 8 v5p chips (8 per device) and on 8 H100s (4 per device).
    ("mistral_7b", 4096, "v5p-16", "dots_no_batch", "auto", 4),
    ("mistral_7b", 4096, "v5p-16", "full", "auto", 8),
    ("mistral_7b", 4096, "h100-8", "full", "auto", 4),
    ("mistral_7b", 4096, "v5p-16", "dots_no_batch", "blocked", 4),
    ("mistral_7b", 4096, "h100-8", "dots_no_batch", "auto", 2),
    ("mistral_7b", 4096, "v5p-8", "full", "auto", 8),
    ("mistral_7b", 4096, "v5p-16", "dots", "auto", 4),
    ("mistral_7b", 4096, "v5p-16", "full", "auto", 16),
    ("mistral_7b", 4096, "v5p-16", "none", "auto", 1),
    ("mistral_7b", 4096, "h100-8", "dots_no_batch", "blocked", 2),
    ("mistral_7b", 4096, "h100-8", "full", "auto", 8),
    ("mistral_7b", 4096, "v5p-64", "full", "auto", 8),
    ("mistral_7b", 4096, "v5p-8", "dots_no_batch", "auto", 2),
    ("mistral_7b", 4096, "h100-8", "dots_no_batch", "auto", 4),
    ("mistral_7b", 2048, "v5p-8", "full", "auto", 16),
    ("mistral_7b", 2048, "v5p-8", "dots_no_batch", "auto", 4),
    ("mistral_7b", 2048, "h100-8", "full", "auto", 8),
    ("mistral_7b", 2048, "v5p-32", "dots_no_batch", "auto", 8),
    # kinoe_9b: the team's model (its own sequence is 2048).
    ("kinoe_9b", 2048, "v5p-8", "dots_no_batch", "auto", 4),
    ("kinoe_9b", 2048, "v5p-8", "full", "auto", 16),
    ("kinoe_9b", 2048, "h100-8", "full", "auto", 8),
    ("kinoe_9b", 2048, "h100-8", "dots_no_batch", "auto", 4),
    ("kinoe_9b", 2048, "v5p-32", "dots_no_batch", "auto", 8),
    ("kinoe_9b", 4096, "v5p-8", "full", "auto", 8),
    ("kinoe_9b", 4096, "h100-8", "full", "auto", 4),
    ("kinoe_9b", 4096, "v5p-32", "dots_no_batch", "auto", 4),
    # mixtral_8x7b: 47B parameters, so 8 chips hold little more than the state.
    ("mixtral_8x7b", 4096, "v5p-32", "full", "auto", 4),
    ("mixtral_8x7b", 4096, "v5p-32", "dots_no_batch", "auto", 2),
    ("mixtral_8x7b", 4096, "h100-8", "full", "auto", 1),
    ("mixtral_8x7b", 4096, "v5p-16", "full", "auto", 2),
    ("mixtral_8x7b", 4096, "v5p-128", "dots_no_batch", "auto", 4),
    ("mixtral_8x7b", 2048, "v5p-32", "full", "auto", 8),
    ("mixtral_8x7b", 2048, "v5p-128", "dots_no_batch", "auto", 8),
    # Low-precision matmuls (ModelConfig.matmul_dtype), each beside its bf16 row above or here.
    ("kinoe_9b", 4096, "h100-8", "full", "auto", 4, "fp8"),
    ("kinoe_9b", 4096, "v5p-16", "full", "auto", 8),
    ("kinoe_9b", 4096, "v5p-16", "full", "auto", 8, "int8"),
    ("kinoe_9b", 4096, "v6e-16", "full", "auto", 2),
    ("kinoe_9b", 4096, "v6e-16", "full", "auto", 2, "int8"),
]

# --smoke: the same process and table for one row that compiles in seconds.
SMOKE_PLAN = [("tiny_ja", 128, "v5p-8", "full", "auto", 1)]
RESULT_LINE = r"^\| \S+ \| \d+ \| \S+ \| \S+ \| .+ \| \d+ \| (yes|\*\*no\*\*) \| "


def key(row) -> str:
    return "/".join(str(x) for x in row)


def devices_of(target: str) -> int:
    sys.path.insert(0, REPO)
    from kinoe_jax.hardware.chips import target as parse

    return parse(target).num_devices


def run_one(row) -> dict:
    model, seq, target, remat, attention, per_device, *matmul = row
    n = devices_of(target)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fit.json")
        cmd = [sys.executable, "-m", "kinoe_jax.aot", f"--gin_file=gin_configs/models/{model}.gin",
               "--gin_file=gin_configs/mesh/fsdp.gin", f"--target={target}", f"--seq_len={seq}",
               f"--global_batch={per_device * n}", f"--json_out={out}",
               f"--gin_bindings=ModelConfig.remat_policy = '{remat}'",
               f"--gin_bindings=ModelConfig.attention_impl = '{attention}'",
               f"--gin_bindings=ModelConfig.max_seq_len = {max(seq, 4096)}"]
        cmd += [f"--gin_bindings=ModelConfig.matmul_dtype = '{m}'" for m in matmul]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode not in (0, 1) or not os.path.exists(out):
            tail = "\n".join(proc.stderr.splitlines()[-5:])
            return dict(key=key(row), row=list(row), error=f"exit {proc.returncode}: {tail}", process_wall_s=wall)
        with open(out, encoding="utf-8") as f:
            fig = json.load(f)
    for drop in ("model",):
        fig.pop(drop, None)
    fig.update(key=key(row), row=list(row), per_device=per_device, process_wall_s=wall)
    return fig


def load(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save(path: str, rows: list) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1, default=str)
    os.replace(tmp, path)


def table(rows: list) -> str:
    head = ("| model | seq | slice | remat | attention | seq/dev | fits | GiB/dev (% HBM) | compiled/formula FLOPs "
            "| collectives GiB/dev (x FSDP ideal) | roofline s/step | tokens/s/chip (bound) | MFU bound |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    good = {r["key"] for r in rows if "error" not in r}
    models = [row[0] for row in PLAN]

    def order(r):
        model, seq, target, remat, attention, per_device, *_ = r["row"]
        platform, size = target.split("-")
        return (models.index(model) if model in models else 99, -seq, platform, int(size), remat, attention,
                per_device)

    for r in sorted(rows, key=order):
        if "error" in r and r["key"] in good:
            continue  # a failed try that a later run of the same row replaced
        model, seq, target, remat, attention, per_device, *matmul = r["row"]
        if matmul:
            attention = f"{attention}, {matmul[0]}"
        if "error" in r:
            lines.append(f"| {model} | {seq} | {target} | {remat} | {attention} | {per_device} | error | "
                         f"{r['error'].splitlines()[-1][:80]} | | | | | |")
            continue
        if "compiler_error" in r:
            need = re.search(r"temporaries \(([0-9.]+G)\)", r["compiler_error"])
            lines.append(f"| {model} | {seq} | {target} | {remat} | {attention} | {per_device} | **no** | "
                         f"compiler: temporaries {need.group(1) if need else '?'} > HBM | | | | | |")
            continue
        coll = sum(r["collective_bytes"].values())
        ideal = f" ({coll / r['fsdp_ideal_bytes']:.2f}x)" if r.get("fsdp_ideal_bytes") else ""
        names = [k["name"] for k in r["kernels"]]
        attn = ("splash" if any(n.startswith("splash") for n in names) else
                "cudnn" if any(n.startswith("__cudnn") for n in names) else "blocked")
        attn += f", {matmul[0]}" if matmul else ""
        tps = r.get("tokens_per_sec_per_device")
        lines.append(
            f"| {model} | {seq} | {target} | {remat} | {attn} | {per_device} | {'yes' if r['fits'] else '**no**'} "
            f"| {r['total_bytes'] / GIB:.1f} ({r['memory_fraction']:.0%}) "
            f"| {r['flops_compiled'] / r['flops_formula']:.2f} | {coll / GIB:.1f}{ideal} "
            f"| {r['roofline_s']:.2f} | {tps:,.0f} | {r['estimated_mfu']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results JSON (appended to, rewritten atomically)")
    parser.add_argument("--only", default=None, help="only rows whose key contains this")
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny row, its results kept only in --out if given: shows that the sweep runs")
    args = parser.parse_args(argv)
    if args.out is None and not args.smoke:
        parser.error("the following arguments are required: --out")
    if args.out is None:
        with tempfile.TemporaryDirectory() as tmp:
            return sweep(os.path.join(tmp, "sweep.json"), SMOKE_PLAN, args.only)
    if args.table:
        print(table(load(args.out)))
        return 0
    return sweep(args.out, SMOKE_PLAN if args.smoke else PLAN, args.only)


def sweep(out: str, plan: list, only: str | None) -> int:
    rows = load(out)
    for row in plan:
        rows = load(out)  # read again: rows may have been added since
        if key(row) in {r["key"] for r in rows} or (only and only not in key(row)):
            continue
        result = run_one(row)
        rows = load(out) + [result]
        save(out, rows)
        status = result.get("error") or result.get("compiler_error") or (
            f"{result['total_bytes'] / GIB:.1f} GiB, fits {result['fits']}, {result['compile_s']:.0f} s compile")
        print(f"{key(row)}: {status}", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
