"""Import a Hugging Face Mistral, Mixtral or Llama directory as a kinoe_jax checkpoint.

    python tools/convert_from_hf.py --hf_dir=IN --output_dir=DIR [--overwrite] [--params_only]

Writes DIR/checkpoints/0 (an Orbax train state: the weights in float32, zero Adam moments, step 0)
and DIR/model_config.gin (the ModelConfig bindings the HF config implies). Continue training with

    python -m kinoe_jax.train --gin_file=gin_configs/runs/tiny_ja.gin --gin_file=DIR/model_config.gin --workdir=DIR

or start another run from the weights with `load_params_from.checkpoint_dir = "DIR/checkpoints"`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kinoe_jax.hf.mapping import ConversionError  # noqa: E402
from kinoe_jax.utils.atomic import OutputExists  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="HF model directory (safetensors, sharded or not)")
    parser.add_argument("--output_dir", required=True, help="the kinoe workdir to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    parser.add_argument("--params_only", action="store_true",
                        help="write only the weights (enough for load_params_from; train.py cannot resume it)")
    parser.add_argument("--gin_file", action="append", default=[],
                        help="the run config you will train with, so the optimizer state has its structure")
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    from kinoe_jax.config import inputs as cli

    cli.check_args(parser, args, {"--hf_dir": cli.directory, "--gin_file": cli.gin_file})

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kinoe_jax.hf.importer import convert_from_hf

    try:
        result = convert_from_hf(args.hf_dir, args.output_dir, overwrite=args.overwrite,
                                 params_only=args.params_only, gin_files=args.gin_file,
                                 gin_bindings=args.gin_bindings, progress=not args.no_progress)
    except (ConversionError, OutputExists) as e:  # an existing output is named the same way
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {result.checkpoint_dir}/0 and {result.gin_file} ({result.num_tensors} tensors, "
          f"{result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
