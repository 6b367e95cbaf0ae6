"""Generation throughput: the kinoe_jax engine against transformers' `generate` (PyTorch).

Same exported model (the tiny_ja preset: 4 layers, hidden 256, 4/2 heads, FFN 704, vocab 4000;
random weights unless --workdir names a trained run), same 16 prompts of mixed lengths, batch
16, greedy, the same number of new tokens for every row (no early stop on either side), same
CPU threads. The two are timed in alternating rounds inside ONE process; the engine's compiles
happen before the first round and are reported apart. Then a fresh engine answers 200 prompts of
mixed lengths, and its compile count and time are reported.

    python tools/bench/bench_generate.py [--rounds 5] [--new_tokens 64] [--workdir runs/tiny_ja]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # the platform settled and accelerators hidden from TensorFlow, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402


def tiny_ja_checkpoint(root: str) -> str:
    """A workdir holding a random checkpoint of the tiny_ja preset and the built-in tokenizer."""
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
    from kinoe_jax.hf.synthetic import write_random_checkpoint
    from kinoe_jax.models import ModelConfig

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    load_gin([os.path.join(repo, "gin_configs/models/tiny_ja.gin")], [])
    cfg = ModelConfig()
    work = os.path.join(root, "run")
    write_random_checkpoint(os.path.join(work, "checkpoints"), dataclasses.replace(cfg, remat_policy="none"),
                            step=0, scale=0.05)
    shutil.copyfile(BUILTIN_TOKENIZER, os.path.join(work, "tokenizer.model"))
    return work


def prompts(vocab, n: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """n prompts from the built-in evaluation set, cut to lengths spread over [2, max_len]."""
    from kinoe_jax.data.vocab import BOS_ID
    from kinoe_jax.eval.dumps import BUILTIN, load_dumps

    texts = [s["prompt"] for _, d in load_dumps(BUILTIN) for s in d["samples"]]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = list(vocab.encode(texts[i % len(texts)] * 8))
        out.append([BOS_ID] + ids[:int(rng.integers(1, max_len))])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="a trained run to export (default: random tiny_ja weights)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--many", type=int, default=200, help="prompts of the compile-count run")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from kinoe_jax.data.vocab import get_vocabulary
    from kinoe_jax.hf.export import convert_to_hf
    from kinoe_jax.inference import Engine, load_for_inference, use_workdir_tokenizer

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    root = tempfile.mkdtemp(prefix="kinoe_bench_generate_")
    try:
        work = args.workdir or tiny_ja_checkpoint(root)
        use_workdir_tokenizer(work)
        hf_dir = os.path.join(root, "hf")
        convert_to_hf(os.path.join(os.path.abspath(work), "checkpoints"), hf_dir, progress=False, log=lambda *a: None)
        cfg, params = load_for_inference(work)
        vocab = get_vocabulary()
        batch = prompts(vocab, args.batch, 120)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # every row runs to the full count, as the engine's

        width = max(len(p) for p in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding, as transformers wants for batched generation
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1

        def hf_run():
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                     pad_token_id=0)
            return out[:, width:].tolist()

        engine = Engine(cfg, params, batch_size=args.batch)

        def kinoe_run():
            return [c.ids for c in engine.generate(batch, args.new_tokens, stop_ids=())]

        t0 = time.perf_counter()
        first = kinoe_run()
        warmup = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(first, hf_run()))
        tokens = args.batch * args.new_tokens
        times = {"kinoe_jax engine": [], "transformers generate": []}
        for _ in range(args.rounds):
            for name, fn in (("kinoe_jax engine", kinoe_run), ("transformers generate", hf_run)):
                t = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t)
                assert sum(len(x) for x in out) == tokens, name

        print(f"machine: {platform.processor() or platform.machine()}, {threads} threads, jax {jax.__version__}, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
              f"vocab {cfg.vocab_size}; {'trained: ' + work if args.workdir else 'random weights'}")
        print(f"batch {args.batch}, prompt lengths {min(map(len, batch))}-{width}, {args.new_tokens} new tokens "
              f"each, greedy; identical outputs: {same}/{args.batch}")
        print(f"engine warm-up (compiles {engine.stats['compiles']}, {engine.stats['compile_seconds']:.2f} s): "
              f"{warmup:.2f} s")
        print("| | median s | tokens/s |\n|---|---:|---:|")
        medians = {k: statistics.median(v) for k, v in times.items()}
        for name, m in medians.items():
            print(f"| {name} | {m:.3f} | {tokens / m:.0f} |")
        print(f"ratio engine / transformers: {medians['transformers generate'] / medians['kinoe_jax engine']:.2f}x")

        many = prompts(vocab, args.many, cfg.max_seq_len - 64, seed=1)
        fresh_cfg = dataclasses.replace(cfg, init_std=cfg.init_std * 1.0001)  # a config no program was compiled for
        fresh = Engine(fresh_cfg, params, batch_size=args.batch)
        t = time.perf_counter()
        out = fresh.generate(many, 32, stop_ids=())
        total = time.perf_counter() - t
        n = sum(len(c.ids) for c in out)
        print(f"{args.many} prompts of {min(map(len, many))}-{max(map(len, many))} tokens, 32 new each: "
              f"{fresh.stats['compiles']} programs compiled in {fresh.stats['compile_seconds']:.1f} s; "
              f"{total:.1f} s in all ({n} tokens, {n / (total - fresh.stats['compile_seconds']):.0f} tokens/s "
              f"after compiling)")
        print("programs:", ", ".join(f"{k[0]}{k[1:]} {s} s" for k, s in fresh.stats["programs"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
