r"""Export a kinoe_jax checkpoint as a Hugging Face model directory.

    python tools/convert_to_hf.py --checkpoint_dir=DIR/checkpoints [--step=N] --output_dir=OUT \
        [--dtype=bfloat16|float32|float16] [--verify] [--overwrite] [--lora=merge|base|adapter --base_model=M]

Writes config.json (MistralForCausalLM, or MixtralForCausalLM for MoE models), sharded
model-0000X-of-0000Y.safetensors with model.safetensors.index.json, generation_config.json and
the tokenizer (SentencePiece model, tokenizer.json, tokenizer_config.json with the chat template).
Tensors are streamed one at a time; OUT appears only when everything (and --verify) succeeded.

A LoRA checkpoint is written with its adapters merged into the weights (--lora=merge, the default),
as the frozen base alone (--lora=base), or as a PEFT adapter directory (--lora=adapter
--base_model=NAME_OR_PATH: adapter_config.json, adapter_model.safetensors and the tokenizer) that
`peft.PeftModel.from_pretrained(base, OUT)` and vLLM's --enable-lora load beside the base model.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kinoe_jax.hf.mapping import ConversionError  # noqa: E402
from kinoe_jax.utils.atomic import OutputExists  # noqa: E402


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True, help="DIR/checkpoints of a training run")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the written weights (default float32: no cast at all)")
    parser.add_argument("--verify", action="store_true",
                        help="compare JAX and HF logits on Japanese text; fail (and write nothing) if they differ")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model (default: DIR/tokenizer.model)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    parser.add_argument("--read_budget", default="2GiB",
                        help="stacked layer arrays larger than this are read a few layers at a time")
    parser.add_argument("--lora", default="merge", choices=("merge", "base", "adapter"),
                        help="for a LoRA checkpoint: merged model (default), the frozen base, or a PEFT adapter")
    parser.add_argument("--base_model", default=None,
                        help="with --lora=adapter: the HF model (directory or hub name) the adapter is loaded onto")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    from kinoe_jax.config import inputs as cli

    cli.check_args(parser, args, {"--checkpoint_dir": cli.directory, "--tokenizer": cli.data_file})

    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion is host work; leave accelerators alone
    from kinoe_jax.hf.export import convert_to_hf

    try:
        result = convert_to_hf(args.checkpoint_dir, args.output_dir, step=args.step, dtype=args.dtype,
                               overwrite=args.overwrite, verify=args.verify, tokenizer=args.tokenizer,
                               max_shard_bytes=_size(args.max_shard_size), read_budget=_size(args.read_budget),
                               progress=not args.no_progress, lora=args.lora, base_model=args.base_model)
    except (ConversionError, OutputExists) as e:  # an existing output is named the same way
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {result.output_dir}: step {result.step}, {result.num_tensors} tensors in {result.num_shards} "
          f"shard(s), {result.total_bytes / 1e9:.3f} GB in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
