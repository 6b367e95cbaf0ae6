"""The --smoke switch the training benchmarks share (the leading underscore keeps this helper out
of the benchmarks tests/e2e/test_bench_smoke.py runs): the script's own code at a toy size, a round
of a step or two, to show it runs (it measures nothing)."""

HELP = "a toy size, a step or two: shows that the benchmark runs, measures nothing"


def add_flag(parser) -> None:
    parser.add_argument("--smoke", action="store_true", help=HELP)


def apply(args, shape_globals: dict, toy_shape: dict, steps: int = 1) -> None:
    """With --smoke, swap the module's shape constants for `toy_shape` and run one short round."""
    if args.smoke:
        shape_globals.update(toy_shape)
        args.rounds, args.steps = 1, steps
