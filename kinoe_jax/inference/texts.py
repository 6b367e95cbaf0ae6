"""Text in, text out: the batched engine behind the training sample, MT-Bench answers and `generate`."""

from __future__ import annotations

from kinoe_jax.data.vocab import BOS_ID, EOS_ID, get_vocabulary
from kinoe_jax.data.chat import conversation as chat
from kinoe_jax.inference.engine import Engine
from kinoe_jax.models import ModelConfig

__all__ = ["generate_ids", "generate_text", "generate_texts", "generate_chat", "generate_chats"]


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
    vocab = get_vocabulary()
    ids = [chat.prompt_ids(chat.check_messages(m, final_assistant=False, allow_empty=True), vocab) for m in conversations]
    engine = engine or Engine(cfg, params, vocab=vocab)
    out = engine.generate(ids, max_new_tokens, stop_ids=(chat.end_id(vocab), EOS_ID), **kwargs)
    return [c.text for c in out]
