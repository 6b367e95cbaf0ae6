"""Generation throughput: the kinoe_jax engine against transformers' `generate` (PyTorch).

Same exported model (a preset of gin_configs/models: tiny_ja, 4 layers, hidden 256, or ja_100m,
12 layers, hidden 768, ~96M parameters; random weights unless --workdir names a trained run),
same 16 prompts of mixed lengths, batch 16, greedy, the same number of new tokens for every row
(no early stop on either side), same CPU threads. The two are timed in alternating rounds inside
ONE process; the engine's compiles happen before the first round and are reported apart. The
load average is printed before and after every timed part: on a shared machine a figure taken
above 1.5 per 2 cores measures the load (torch's per-token loop collapses under it), not the
engines. Then the per-iteration cost of a `lax.while_loop` on this backend, and a fresh engine
answering --many prompts of mixed lengths (its compile count and time).

--roofline h100-8,v5p-8 compiles ONE decode step of the model (bf16, batch split over the
devices, weights replicated) with each target's compiler and compares the HLO roofline with the
memory-bandwidth bound: the weights plus the filled part of the KV cache, read once per token.

    python tools/bench/bench_generate.py [--model ja_100m] [--rounds 5] [--new_tokens 64]
    python tools/bench/bench_generate.py --model ja_100m --roofline h100-8,v5p-8 --rounds 0 --many 0
    python tools/bench/bench_generate.py --smoke      # seconds: every part at toy sizes
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from kinoe_jax.hardware import runtime  # noqa: E402

runtime.setup()  # the platform settled and accelerators hidden from TensorFlow, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

RESULT_LINE = r"^ratio engine / transformers: [0-9.]+x"


def model_config(preset: str):
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.models import ModelConfig

    path = os.path.join(REPO, "gin_configs", "models", f"{preset}.gin")
    if not os.path.exists(path):
        raise SystemExit(f"--model {preset}: no preset {path}")
    load_gin([path], [])
    return ModelConfig()


def random_checkpoint(root: str, cfg) -> str:
    """A workdir holding a random checkpoint of `cfg` and the built-in tokenizer."""
    from kinoe_jax.data.vocab import BUILTIN_TOKENIZER
    from kinoe_jax.hf.synthetic import write_random_checkpoint

    work = os.path.join(root, "run")
    write_random_checkpoint(os.path.join(work, "checkpoints"), dataclasses.replace(cfg, remat_policy="none"),
                            step=0, scale=0.05)
    shutil.copyfile(BUILTIN_TOKENIZER, os.path.join(work, "tokenizer.model"))
    return work


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (5 min {five:.2f})"


def while_loop_overhead(iterations: int = 20000) -> float:
    """Seconds per iteration of a `lax.while_loop` whose body updates one small vector (the trip
    count is an argument, so the compiler cannot unroll or fold the loop)."""
    import jax.numpy as jnp

    loop = jax.jit(lambda n, x: jax.lax.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] * 1.0001 + 1.0),
                                                   (jnp.int32(0), x))[1])
    x = jnp.ones((16,), jnp.float32)
    jax.block_until_ready(loop(jnp.int32(1), x))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(loop(jnp.int32(iterations), x))
        best = min(best, time.perf_counter() - t)
    return best / iterations


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


def compare(cfg, args, root):
    """The engine and transformers' generate on the same batch, alternating rounds."""
    import torch
    from transformers import AutoModelForCausalLM

    from kinoe_jax.data.vocab import get_vocabulary
    from kinoe_jax.hf.export import convert_to_hf
    from kinoe_jax.inference import Engine, load_for_inference, use_workdir_tokenizer

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    work = args.workdir or random_checkpoint(root, cfg)
    use_workdir_tokenizer(work)
    hf_dir = os.path.join(root, "hf")
    convert_to_hf(os.path.join(os.path.abspath(work), "checkpoints"), hf_dir, progress=False, log=lambda *a: None)
    cfg, params = load_for_inference(work)
    vocab = get_vocabulary()
    batch = prompts(vocab, args.batch, args.prompt_len)
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
    print(f"machine: {platform.processor() or platform.machine()}, {threads} threads, jax {jax.__version__}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"model {args.model}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads}/"
          f"{cfg.num_kv_heads} heads, FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
          f"{cfg.num_params() / 1e6:.1f}M parameters; {'trained: ' + work if args.workdir else 'random weights'}")
    print(f"batch {args.batch}, prompt lengths {min(map(len, batch))}-{width}, {args.new_tokens} new tokens "
          f"each, greedy; identical outputs: {same}/{args.batch}")
    print(f"engine warm-up (compiles {engine.stats['compiles']}, {engine.stats['compile_seconds']:.2f} s): "
          f"{warmup:.2f} s")
    times = {"kinoe_jax engine": [], "transformers generate": []}
    print(f"before the rounds: {load()}")
    for _ in range(args.rounds):
        for name, fn in (("kinoe_jax engine", kinoe_run), ("transformers generate", hf_run)):
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            assert sum(len(x) for x in out) == tokens, name
    print(f"after the rounds: {load()}")
    print(f"| | median s ({args.rounds} rounds) | tokens/s |\n|---|---:|---:|")
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, m in medians.items():
        print(f"| {name} | {m:.3f} | {tokens / m:.0f} |")
    print(f"ratio engine / transformers: {medians['transformers generate'] / medians['kinoe_jax engine']:.2f}x "
          f"(per round: {', '.join(f'{h / k:.2f}' for k, h in zip(*times.values()))})")
    return cfg, params, vocab


def compile_count(cfg, params, vocab, args):
    from kinoe_jax.inference import Engine

    many = prompts(vocab, args.many, min(cfg.max_seq_len - 64, args.many_len), seed=1)
    fresh_cfg = dataclasses.replace(cfg, init_std=cfg.init_std * 1.0001)  # a config no program was compiled for
    fresh = Engine(fresh_cfg, params, batch_size=args.batch)
    print(f"before the compile-count run: {load()}")
    t = time.perf_counter()
    out = fresh.generate(many, 32, stop_ids=())
    total = time.perf_counter() - t
    n = sum(len(c.ids) for c in out)
    print(f"after it: {load()}")
    print(f"{args.many} prompts of {min(map(len, many))}-{max(map(len, many))} tokens, 32 new each: "
          f"{fresh.stats['compiles']} programs compiled in {fresh.stats['compile_seconds']:.1f} s; "
          f"{total:.1f} s in all ({n} tokens, {n / (total - fresh.stats['compile_seconds']):.0f} tokens/s "
          f"after compiling)")
    print("programs:", ", ".join(f"{k[0]}{k[1:]} {s} s" for k, s in fresh.stats["programs"]))


def roofline(cfg, target_name: str, batch: int, prompt_len: int, new_tokens: int) -> str:
    """One decode step compiled for a target: its HLO roofline against the memory-bandwidth bound."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kinoe_jax.hardware.chips import target
    from kinoe_jax.inference import cached, layout
    from kinoe_jax.models import Transformer
    from kinoe_jax.parallel.mesh import make_mesh
    from kinoe_jax.planning import hlo_parse, hlo_stats

    tgt = target(target_name)
    mesh = make_mesh(data=-1, devices=tgt.devices())  # rows split over the devices, weights whole on each
    cfg = dataclasses.replace(cfg, dtype="bfloat16", remat_policy="none")
    bucket = layout.next_pow2(prompt_len, 16)
    slots = layout.next_cache_len(bucket + new_tokens)
    filled = bucket + new_tokens // 2  # the middle step of the generation
    if batch % mesh.size:
        raise SystemExit(f"--batch {batch} does not split over the {mesh.size} devices of {target_name}")
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    full = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), nn.meta.unbox(boxed["params"]))
    flags = []

    def split(p):
        pairs = cached.layer_params(cfg, p)
        flags[:] = [m for m, _ in pairs]
        return [t for _, t in pairs]

    layers = jax.eval_shape(split, full)
    top = {k: v for k, v in full.items() if not k.startswith("layers")}
    cache = jax.eval_shape(lambda: cached.empty_cache(cfg, batch, slots))
    rows = NamedSharding(mesh, P("data"))
    whole = NamedSharding(mesh, P())

    def one_step(top, layers, cache, token, pos, valid, start, index):
        logits, cache = cached.step(cfg, top, list(zip(flags, layers)), cache, token, pos, valid, start, index)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    row = jax.ShapeDtypeStruct((batch,), jnp.int32)
    args = (top, layers, cache, row, row, row, row, jax.ShapeDtypeStruct((), jnp.int32))
    shardings = (whole, whole, rows, rows, rows, rows, rows, whole)
    with nn.logical_axis_rules(()):
        compiled = jax.jit(one_step, in_shardings=shardings, out_shardings=(rows, rows),
                           donate_argnums=(2,)).lower(*args).compile()
    chip, text = tgt.chip, compiled.as_text()
    stats = hlo_stats.analyze(text, mesh.size, chip.peak_tflops * 1e12, chip.hbm_gbps * 1e9)
    # The TPU compiler stages weights into on-chip memory (copy-start into memory space S(1)); the
    # HLO pricing counts such an array 4 times (the read, the copy's two buffers, the consumer's
    # read of the staged copy) where HBM sees it once.
    comps, entry = hlo_parse.parse(text)
    staged = sum((hlo_parse.nbytes(i.shape) - 4) / 2 for i in comps[entry] if i.opcode == "copy-start")
    weights = sum(x.size * 2 for x in jax.tree.leaves(full))
    per_slot = batch // mesh.size * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.dim_per_head * 2
    bound = (weights + per_slot * filled) / (chip.hbm_gbps * 1e9)
    whole_cache = (weights + per_slot * slots) / (chip.hbm_gbps * 1e9)
    return (f"{tgt.describe()}: one decode step of {cfg.num_params() / 1e6:.1f}M parameters (bf16), {batch} rows "
            f"({batch // mesh.size} per device), cache {slots} slots, {filled} filled: roofline "
            f"{stats.roofline_s * 1e6:.1f} us, {stats.bytes_accessed / 1e6:.1f} MB accessed per device; bound "
            f"(weights {weights / 1e6:.1f} MB + filled cache {per_slot * filled / 1e6:.1f} MB) {bound * 1e6:.1f} us "
            f"-> {stats.roofline_s / bound:.2f}x the bound (the whole cache read: {whole_cache * 1e6:.1f} us); "
            f"collectives {dict(stats.collective_bytes) or 'none'}"
            + (f"; {staged / 1e6:.1f} MB staged on chip: counted once, {(stats.bytes_accessed - 3 * staged) / 1e6:.1f} "
               f"MB -> {(stats.bytes_accessed - 3 * staged) / (chip.hbm_gbps * 1e9) / bound:.2f}x the bound "
               f"(bandwidth alone)" if staged else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny_ja", help="a preset of gin_configs/models (tiny_ja, ja_100m)")
    parser.add_argument("--workdir", default=None, help="a trained run to export (default: random weights)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each side (0: no comparison)")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=120, help="prompts are 2 to this many tokens")
    parser.add_argument("--many", type=int, default=200, help="prompts of the compile-count run (0: skip it)")
    parser.add_argument("--many_len", type=int, default=448, help="their longest prompt (at most the context - 64)")
    parser.add_argument("--roofline", default="", help="targets to compile one decode step for, e.g. h100-8,v5p-8")
    parser.add_argument("--smoke", action="store_true", help="every part at toy sizes, in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.rounds, args.new_tokens, args.batch, args.prompt_len = "tiny_ja", 1, 4, 4, 20
        args.many, args.many_len = 4, 40
    if args.rounds < 0 or args.new_tokens < 1 or args.batch < 1 or args.prompt_len < 2 or args.many < 0:
        raise SystemExit("--rounds and --many must be >= 0, --new_tokens and --batch >= 1, --prompt_len >= 2")
    cfg = model_config(args.model)
    root = tempfile.mkdtemp(prefix="kinoe_bench_generate_")
    try:
        if args.rounds:
            result = compare(cfg, args, root)
            print(f"lax.while_loop on {jax.default_backend()}: {while_loop_overhead() * 1e6:.2f} us per iteration "
                  f"(a body of one small vector update; {load()})")
            if args.many:
                compile_count(*result, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name in filter(None, args.roofline.split(",")):
        print(roofline(cfg, name.strip(), args.batch, args.prompt_len, args.new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
