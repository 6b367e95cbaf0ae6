"""Conversion speed and memory at ~1B parameters, against the disk's own write speed.

    python tools/bench/bench_convert.py [--workdir=DIR] [--layers=20] [--hidden=2048] [--keep]
    python tools/bench/bench_convert.py --tokenizer_only
    python tools/bench/bench_convert.py --smoke

In one run, on one disk:
  1. the disk: write a file as large as the exported model (64 MiB blocks, then fsync) -> MB/s;
  2. a synthetic random kinoe checkpoint of ~1.04B parameters, each stacked leaf stored as one
     chunk (what a single-device training save writes: the hardest case for a reader);
  3. kinoe -> HF (bfloat16), HF -> kinoe (full train state), and kinoe -> HF again from the
     import (per-layer chunks) with --read_budget=256MiB; each conversion is a fresh process of
     the real CLI, timed, with its peak RSS from wait4;
  4. the same three conversions of a tiny model: the fixed overhead (Python, JAX, Orbax).
Prints a JSON summary and Markdown table rows for BENCHMARKS.md; deletes everything unless --keep.
With --smoke, a one-layer model stands in for the 1B one and step 4 is left out (seconds, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULT_LINE = r"^\| kinoe → HF bf16 \(stacked chunks\) \| [0-9.]+ \|"
sys.path.insert(0, str(REPO))


def disk_write_mb_s(path: Path, nbytes: int) -> dict:
    block = os.urandom(64 * 2**20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(block))):
            f.write(block)
        t_written = time.perf_counter()
        f.flush()
        os.fsync(f.fileno())
    t1 = time.perf_counter()
    size = path.stat().st_size
    path.unlink()
    return {"bytes": size, "buffered_mb_s": size / (t_written - t0) / 1e6, "synced_mb_s": size / (t1 - t0) / 1e6}


# Linux charges a child the memory of the process it was forked from (its peak RSS starts at the
# parent's), so each conversion is started by this small launcher and measured there.
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - t0,
                  "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}))
"""


def run_tool(args: list[str]) -> dict:
    """Run a CLI in a fresh process: wall time, time to flush its writes, and peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], cwd=REPO, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {"code": proc.returncode}
    if result["code"] != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    t1 = time.perf_counter()
    os.sync()  # what the conversion left in the page cache reaches the disk
    return {"wall_s": result["wall_s"], "cpu_s": result["cpu_s"], "sync_s": time.perf_counter() - t1,
            "peak_rss_mb": result["peak_rss_mb"], "load_avg_1m": os.getloadavg()[0]}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_config(layers: int, hidden: int):
    from kinoe_jax.models import ModelConfig

    return ModelConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_layers=layers,
                       num_heads=hidden // 128, num_kv_heads=max(1, hidden // 512), max_seq_len=2048)


def conversions(root: Path, cfg, tag: str, tokenizer: str) -> dict:
    from kinoe_jax.hf.synthetic import write_random_checkpoint

    ckpt = root / f"{tag}_run" / "checkpoints"
    t0 = time.perf_counter()
    write_random_checkpoint(str(ckpt), cfg, per_layer_chunks=False)
    made = time.perf_counter() - t0
    hf, back, again = root / f"{tag}_hf", root / f"{tag}_kinoe", root / f"{tag}_hf2"
    res = {"make_checkpoint_s": made, "checkpoint_bytes": du(ckpt)}
    res["to_hf"] = run_tool(["tools/convert_to_hf.py", f"--checkpoint_dir={ckpt}", f"--output_dir={hf}",
                             "--dtype=bfloat16", f"--tokenizer={tokenizer}", "--no_progress"])
    res["to_hf"]["bytes_written"] = du(hf)
    res["from_hf"] = run_tool(["tools/convert_from_hf.py", f"--hf_dir={hf}", f"--output_dir={back}", "--no_progress"])
    res["from_hf"]["bytes_written"] = du(back)
    res["to_hf_budget"] = run_tool(["tools/convert_to_hf.py", f"--checkpoint_dir={back}/checkpoints",
                                    f"--output_dir={again}", "--dtype=bfloat16", "--read_budget=256MiB",
                                    "--no_progress"])
    res["to_hf_budget"]["bytes_written"] = du(again)
    same = all((hf / f).read_bytes() == (again / f).read_bytes() for f in os.listdir(hf) if f.endswith(".safetensors"))
    res["round_trip_identical"] = same
    return res


def tokenizer_speed(rounds: int = 3) -> dict:
    """Characters/s on the built-in corpus: the exported fast tokenizer, the same without the kana
    voicing rules, and SentencePiece itself (the reference), alternating in one process."""
    import glob

    import sentencepiece as spm
    from tokenizers import normalizers

    from kinoe_jax.data.vocab import BUILTIN_DIR, BUILTIN_TOKENIZER
    from kinoe_jax.hf import tokenizer as tok_lib

    texts = [line for f in sorted(glob.glob(os.path.join(BUILTIN_DIR, "corpus", "*", "*.jsonl")))
             for line in open(f, encoding="utf-8")] * 5
    chars = sum(len(t) for t in texts)
    proto = tok_lib.load_proto(BUILTIN_TOKENIZER)
    exported = tok_lib.build_fast(proto)
    plain = tok_lib.build_fast(proto)
    plain.normalizer = normalizers.Sequence([normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
                                             normalizers.Replace(" ", "\u2581")])
    sp = spm.SentencePieceProcessor(model_file=BUILTIN_TOKENIZER)
    runs = {"exported fast tokenizer": lambda: exported.encode_batch(texts, add_special_tokens=False),
            "same without the voicing rules": lambda: plain.encode_batch(texts, add_special_tokens=False),
            "SentencePiece": lambda: sp.encode(texts)}
    best = {k: float("inf") for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: chars / sec / 1e6 for name, sec in best.items()} | {"characters": chars}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="scratch directory on the disk to measure")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--tokenizer_only", action="store_true", help="only the tokenizer throughput")
    parser.add_argument("--smoke", action="store_true",
                        help="a toy size, a step or two: shows that the benchmark runs, measures nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden = 1, 128
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.tokenizer_only:
        speed = tokenizer_speed()
        print(json.dumps(speed, indent=2))
        for name, value in speed.items():
            if name != "characters":
                print(f"| {name} | {value:.2f} |")
        return 0

    from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
    from kinoe_jax.hf.mapping import entries, param_shapes

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    root.mkdir(parents=True, exist_ok=True)
    big, tiny = model_config(args.layers, args.hidden), model_config(2, 256)
    shapes = param_shapes(big)
    leaf_mb = max(4 * _prod(s) for s in shapes.values()) / 2**20
    tensor_mb = max(4 * _prod(e.kinoe_shape) for e in entries(big, shapes)) / 2**20
    summary = {"params": big.num_params(), "model_fp32_mb": big.num_params() * 4 / 2**20,
               "largest_stacked_leaf_fp32_mb": leaf_mb, "largest_hf_tensor_fp32_mb": tensor_mb}
    try:
        summary["disk"] = disk_write_mb_s(root / "disk_probe.bin", big.num_params() * 2)
        if not args.smoke:  # a smoke run's one model is already a tiny one
            summary["tiny"] = conversions(root, tiny, "tiny", BUILTIN_TOKENIZER)
        summary["big"] = conversions(root, big, "big", BUILTIN_TOKENIZER)
        summary.setdefault("tiny", summary["big"])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary, indent=2))
    disk = summary["disk"]["synced_mb_s"]
    print(f"\nload average at the end: {os.getloadavg()}")
    print("\n| conversion | wall s | + sync s | CPU s | written GB | MB/s (wall + sync) | vs disk | peak RSS MB | tiny model: RSS MB, wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, label in [("to_hf", "kinoe → HF bf16 (stacked chunks)"), ("from_hf", "HF bf16 → kinoe train state"),
                       ("to_hf_budget", "kinoe → HF bf16, --read_budget=256MiB")]:
        r, t = summary["big"][key], summary["tiny"][key]
        mb_s = r["bytes_written"] / (r["wall_s"] + r["sync_s"]) / 1e6
        print(f"| {label} | {r['wall_s']:.1f} | {r['sync_s']:.1f} | {r['cpu_s']:.1f} | {r['bytes_written'] / 1e9:.2f} | "
              f"{mb_s:.0f} | {mb_s / disk:.2f} | {r['peak_rss_mb']:.0f} | {t['peak_rss_mb']:.0f}, {t['wall_s']:.1f} |")
    return 0


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


if __name__ == "__main__":
    sys.exit(main())
