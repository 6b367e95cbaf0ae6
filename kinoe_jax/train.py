"""Train a kinoe_jax model: pretraining, SFT and DPO, with full parameters or LoRA.

    python -m kinoe_jax.train --gin_file=gin_configs/runs/tiny_ja.gin [--gin_bindings='train.total_steps = 10'] [--workdir=DIR]

The loop itself is kinoe_jax/training/loop.py; this module only reads the command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from kinoe_jax.config import inputs as cli
from kinoe_jax.hardware import runtime
from kinoe_jax.utils import console
from kinoe_jax.utils.errors import ConfigError

INPUTS = {"--gin_file": cli.gin_file}


def main(argv=None) -> None:
    cli.precheck(INPUTS, argv)  # a bad --gin_file is named before TensorFlow and JAX load
    runtime.setup()
    # These load JAX and TensorFlow, which must wait for setup().
    from kinoe_jax.config.gin_io import load_gin  # noqa: PLC0415
    from kinoe_jax.parallel import multihost  # noqa: PLC0415
    from kinoe_jax.training import loop  # noqa: PLC0415 (also registers every gin configurable of a run)

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    parser.add_argument("--workdir", default=None, help="output directory (default: runs/<first gin file>)")
    parser.add_argument("--verbose", action="store_true",
                        help="show every log line on the terminal (they always go to DIR/logs/)")
    multihost.add_flags(parser)
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. gin_configs/runs/tiny_ja.gin)")
    cli.check_args(parser, args, INPUTS)
    with cli.reported(parser, ConfigError):
        load_gin(args.gin_file, args.gin_bindings)
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.gin_file[0]))[0])
    multihost.initialize(workdir, **multihost.flag_values(args))  # before anything touches devices
    with multihost.report_errors():
        loop.train(workdir)
    multihost.finish()


if __name__ == "__main__":
    sys.exit(main())
