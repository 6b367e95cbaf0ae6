"""Sample from a trained model with a KV cache.

    python -m kinoe_jax.generate --workdir=DIR --prompt='日本の四季について'
    python -m kinoe_jax.generate --checkpoint=DIR/checkpoints/300 --prompt='...' --temperature=0.8 --top_p=0.9
    python -m kinoe_jax.generate --workdir=SFT_DIR --chat --prompt='川柳を一句お願いします。'
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import kinoe_jax.data  # noqa: F401  (hides accelerators from TensorFlow)

import jax
import jax.numpy as jnp
import numpy as np

from kinoe_jax.data.vocab import BOS_ID, EOS_ID, get_vocabulary
from kinoe_jax.models import ModelConfig, Transformer


def _filter_top_p(logits, top_p: float):
    """Keep the smallest set of tokens whose probability mass reaches top_p (nucleus sampling)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # The threshold is the logit of the last token needed to reach top_p.
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def _pick(logits, rng, temperature: float, top_p: float):
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1)


def generate_ids(cfg: ModelConfig, params, prompt_ids: list[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: tuple[int, ...] = (EOS_ID,)) -> list[int]:
    """New token ids after `prompt_ids` (which should start with BOS), one sequence."""
    n = len(prompt_ids)
    cache_len = n + max_new_tokens
    cfg = dataclasses.replace(cfg, max_seq_len=cache_len, scan_layers=cfg.scan_layers, remat_policy="none")
    model = Transformer(cfg, decode=True)

    @jax.jit
    def prefill(params, tokens):
        positions = jnp.arange(tokens.shape[1])[None]
        (logits, _), vars_ = model.apply({"params": params}, tokens, positions, jnp.ones_like(tokens),
                                         mutable=["cache"])
        return logits[:, -1], vars_["cache"]

    @jax.jit
    def step(params, cache, token, position, rng):
        (logits, _), vars_ = model.apply({"params": params, "cache": cache}, token[:, None], position[:, None],
                                         jnp.ones_like(token)[:, None], mutable=["cache"])
        return logits[:, -1], vars_["cache"]

    rng = jax.random.PRNGKey(seed)
    logits, cache = prefill(params, jnp.asarray([prompt_ids], jnp.int32))
    out: list[int] = []
    for i in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        token = _pick(logits, sub, temperature, top_p)
        tid = int(token[0])
        if tid in stop_ids:
            break
        out.append(tid)
        if i + 1 == max_new_tokens:
            break
        logits, cache = step(params, cache, token.astype(jnp.int32), jnp.asarray([n + i], jnp.int32), sub)
    return out


def generate_text(cfg: ModelConfig, params, prompt: str, max_new_tokens: int = 64, **kwargs) -> str:
    vocab = get_vocabulary()
    ids = [BOS_ID] + list(vocab.encode(prompt))
    return vocab.decode(generate_ids(cfg, params, ids, max_new_tokens, **kwargs))


def generate_chat(cfg: ModelConfig, params, messages: list[dict], max_new_tokens: int = 256, **kwargs) -> str:
    """The assistant's next reply to `messages` (ending with a user turn), through the chat
    template exactly as SFT rendered it; generation stops at <|end|>."""
    from kinoe_jax.sft.conversation import check_messages, end_id, prompt_ids

    vocab = get_vocabulary()
    ids = prompt_ids(check_messages(messages, final_assistant=False, allow_empty=True), vocab)
    out = generate_ids(cfg, params, ids, max_new_tokens, stop_ids=(end_id(vocab), EOS_ID), **kwargs)
    return vocab.decode(out)


def load_for_inference(path: str, step: int | None = None):
    """(ModelConfig, params) from a workdir, its checkpoints/ dir, or one step's directory."""
    import orbax.checkpoint as ocp
    from etils import epath

    from kinoe_jax.checkpoint import read_model_config

    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
        step, path = int(os.path.basename(path)), os.path.dirname(path)
    step, cfg_dict = read_model_config(path, step)
    cfg = ModelConfig(**cfg_dict)
    state_dir = epath.Path(path) / str(step) / "state"
    meta = ocp.PyTreeCheckpointer().metadata(state_dir)
    tree = getattr(meta, "item_metadata", meta)  # newer Orbax wraps the tree in StepMetadata
    tree = getattr(tree, "tree", tree)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params_meta = dict(tree)["params"]
    restore_args = jax.tree.map(lambda m: ocp.ArrayRestoreArgs(sharding=sharding, dtype=np.float32), params_meta)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item={"params": params_meta},
                                               restore_args={"params": restore_args}, partial_restore=True))
    return cfg, restored["params"]


def _use_workdir_tokenizer(path: str) -> None:
    """A run copies its tokenizer into the workdir; prefer it to the built-in one."""
    import gin

    from kinoe_jax.data import vocab as vocab_lib

    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        tok = os.path.join(candidate, "tokenizer.model")
        if os.path.exists(tok):
            gin.bind_parameter("tokenizer_path.path", tok)
            vocab_lib._vocab.cache_clear()
            return


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (latest checkpoint)")
    src.add_argument("--checkpoint", help="a checkpoints/ directory or one step's directory")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="the prompt is a user turn of the chat template; "
                        "print the assistant's reply (up to <|end|>)")
    parser.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    args = parser.parse_args(argv)
    path = args.workdir or args.checkpoint
    if not os.path.exists(path):
        parser.error(f"{path} does not exist")
    _use_workdir_tokenizer(os.path.abspath(path))
    cfg, params = load_for_inference(path, args.step)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        reply = generate_chat(cfg, params, messages, args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed)
        print(reply)
        return reply
    text = generate_text(cfg, params, args.prompt, args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed)
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
