"""THE chat template: used by SFT data, by kinoe_jax.generate, and exported to the HF tokenizer.

A conversation renders as
    <BOS><|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n
The control pieces and "\\n" are user-defined symbols of the tokenizer, so they are always whole
tokens and act as hard boundaries: tokenizing the rendered string equals concatenating the
tokenization of its parts, which is what lets SFT put the loss on assistant parts only while
`tokenizer.apply_chat_template` in transformers produces exactly the same ids.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")
END = "<|end|>"

# Jinja for transformers' tokenizer_config.json["chat_template"]; must match render() below.
JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def header(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}; expected one of {ROLES}")
    return f"<|{role}|>\n"


def segments(messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """(text, trained_on) pieces in order; trained_on marks assistant content and its <|end|>."""
    out: list[tuple[str, bool]] = []
    for m in messages:
        role, content = m["role"], m["content"]
        out.append((header(role), False))
        if role == "assistant":
            out.append((content + END, True))
            out.append(("\n", False))
        else:
            out.append((content + END + "\n", False))
    if add_generation_prompt:
        out.append((header("assistant"), False))
    return out


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The rendered text without BOS (the tokenizer side adds BOS as an id)."""
    return "".join(text for text, _ in segments(messages, add_generation_prompt))
