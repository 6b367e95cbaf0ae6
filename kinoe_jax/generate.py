"""Generate from a trained model (the batched engine in kinoe_jax/inference/).

    python -m kinoe_jax.generate --workdir=DIR --prompt='日本の四季について'
    python -m kinoe_jax.generate --checkpoint=DIR/checkpoints/300 --prompt='...' --temperature=0.8 --top_p=0.9
    python -m kinoe_jax.generate --workdir=SFT_DIR --chat --prompt='川柳を一句お願いします。'
"""

from __future__ import annotations

import argparse
import sys

from kinoe_jax import cli

INPUTS = {"--workdir": cli.directory, "--checkpoint": cli.directory, "--prompt": cli.text_arg, "--system": cli.text_arg}
if __name__ == "__main__":  # a bad path or prompt is named before TensorFlow and JAX load
    cli.precheck(INPUTS)

import kinoe_jax.data  # noqa: F401,E402  (hides accelerators from TensorFlow)

from kinoe_jax.data.vocab import BOS_ID, EOS_ID, get_vocabulary
from kinoe_jax.inference import Engine, load_for_inference, use_workdir_tokenizer
from kinoe_jax.inference.sampling import filter_top_p as _filter_top_p  # noqa: F401  (the one top-p filter)
from kinoe_jax.models import ModelConfig

__all__ = ["generate_ids", "generate_text", "generate_texts", "generate_chat", "generate_chats", "load_for_inference"]


def generate_ids(cfg: ModelConfig, params, prompt_ids: list[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: tuple[int, ...] = (EOS_ID,), top_k: int = 0) -> list[int]:
    """New token ids after `prompt_ids` (which should start with BOS), one sequence."""
    engine = Engine(cfg, params, batch_size=1)
    return engine.generate([prompt_ids], max_new_tokens, stop_ids=stop_ids, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed)[0].ids


def generate_text(cfg: ModelConfig, params, prompt: str, max_new_tokens: int = 64, **kwargs) -> str:
    """The continuation of `prompt` (BOS + its tokens); every process of a multi-host run calls it."""
    return generate_texts(cfg, params, [prompt], max_new_tokens, **kwargs)[0]


def generate_texts(cfg: ModelConfig, params, prompts: list[str], max_new_tokens: int = 64,
                   stop_ids: tuple[int, ...] = (EOS_ID,), **kwargs) -> list[str]:
    vocab = get_vocabulary()
    ids = [[BOS_ID] + list(vocab.encode(p)) for p in prompts]
    return [c.text for c in Engine(cfg, params, vocab=vocab).generate(ids, max_new_tokens, stop_ids=stop_ids,
                                                                      **kwargs)]


def generate_chat(cfg: ModelConfig, params, messages: list[dict], max_new_tokens: int = 256, **kwargs) -> str:
    """The assistant's next reply to `messages` (ending with a user turn), through the chat
    template exactly as SFT rendered it; generation stops at <|end|>."""
    return generate_chats(cfg, params, [messages], max_new_tokens, **kwargs)[0]


def generate_chats(cfg: ModelConfig, params, conversations: list[list[dict]], max_new_tokens: int = 256,
                   engine: Engine | None = None, **kwargs) -> list[str]:
    """Replies to many conversations in batches."""
    from kinoe_jax.sft.conversation import check_messages, end_id, prompt_ids

    vocab = get_vocabulary()
    ids = [prompt_ids(check_messages(m, final_assistant=False, allow_empty=True), vocab) for m in conversations]
    engine = engine or Engine(cfg, params, vocab=vocab)
    out = engine.generate(ids, max_new_tokens, stop_ids=(end_id(vocab), EOS_ID), **kwargs)
    return [c.text for c in out]


def main(argv=None):
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
