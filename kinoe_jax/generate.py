"""Generate from a trained model (the batched engine in kinoe_jax/inference/).

    python -m kinoe_jax.generate --workdir=DIR --prompt='日本の四季について'
    python -m kinoe_jax.generate --checkpoint=DIR/checkpoints/300 --prompt='...' --temperature=0.8 --top_p=0.9
    python -m kinoe_jax.generate --workdir=SFT_DIR --chat --prompt='川柳を一句お願いします。'
"""

from __future__ import annotations

import argparse
import sys

from kinoe_jax.config import inputs as cli
from kinoe_jax.hardware import runtime

INPUTS = {"--workdir": cli.directory, "--checkpoint": cli.directory, "--prompt": cli.text_arg, "--system": cli.text_arg}


def main(argv=None):
    cli.precheck(INPUTS, argv)  # a bad path or prompt is named before TensorFlow and JAX load
    runtime.setup()
    # These load JAX and TensorFlow, which must wait for setup().
    from kinoe_jax.inference.loading import load_for_inference, use_workdir_tokenizer  # noqa: PLC0415
    from kinoe_jax.inference.texts import generate_chats, generate_texts  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (latest checkpoint)")
    src.add_argument("--checkpoint", help="a checkpoints/ directory or one step's directory")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompt", action="append", required=True,
                        help="repeat it to generate for several prompts in one batch")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="the prompt is a user turn of the chat template; "
                        "print the assistant's reply (up to <|end|>)")
    parser.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    args = parser.parse_args(argv)
    cli.check_args(parser, args, INPUTS)
    path = args.workdir or args.checkpoint
    use_workdir_tokenizer(path)
    with cli.reported(parser, FileNotFoundError):  # a directory holding no checkpoint (or not that --step)
        cfg, params = load_for_inference(path, args.step)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    try:
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            outs = generate_chats(cfg, params, [system + [{"role": "user", "content": p}] for p in args.prompt],
                                  args.max_new_tokens, **sampling)
        else:
            outs = generate_texts(cfg, params, args.prompt, args.max_new_tokens, **sampling)
    except ValueError as e:  # bad sampling settings, a prompt the chat template refuses
        parser.error(str(e))
    for prompt, text in zip(args.prompt, outs):
        print(text if args.chat else prompt + text)
    return outs[0] if len(outs) == 1 else outs


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
