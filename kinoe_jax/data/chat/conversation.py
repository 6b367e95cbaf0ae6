"""What makes a conversation trainable, and its token ids with the loss mask.

Both the seqio preprocessor and the python validation pass call these functions, so what gets
reported as skipped is exactly what the training stream drops.
"""

from __future__ import annotations

import json

from kinoe_jax.data.chat import template as chat_template
from kinoe_jax.data.vocab import BOS_ID, CHAT_SYMBOLS

# Reason codes, in the order they are checked; the values are what reports print.
REASONS = {
    "malformed_json": "the line is not a JSON object",
    "missing_messages": "no 'messages' list",
    "empty_conversation": "'messages' is empty",
    "bad_message": "a message is not {'role': str, 'content': str} or its content is empty",
    "unknown_role": "a role other than system/user/assistant",
    "control_token": "content contains a chat control piece",
    "no_assistant_turn": "no assistant turn to learn from",
    "role_order": "roles out of order (optional system first, then user/assistant alternating, "
                  "ending with assistant)",
    "bad_pair": "'chosen' and 'rejected' must be two different non-empty strings",
    "prompt_too_long": "the text before the first assistant token is longer than the sequence",
    "too_long": "the whole conversation is longer than the sequence",
}


class BadExample(ValueError):
    """Why a line cannot be used: a reason code (REASONS, or a validator's own) and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail or REASONS.get(reason, '')}")


def check_messages(messages, *, final_assistant: bool = True, allow_empty: bool = False) -> list[dict]:
    """Raise BadExample unless `messages` is [system?] user assistant (user assistant)*.

    With final_assistant=False the conversation must instead end with a user turn (a prompt).
    allow_empty accepts empty contents (a model's earlier reply may be empty when prompting).
    """
    if not isinstance(messages, list):
        raise BadExample("missing_messages", f"'messages' is {type(messages).__name__}, not a list")
    if not messages:
        raise BadExample("empty_conversation")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadExample("bad_message", f"messages[{i}] = {_short(m)}")
        if m["role"] not in chat_template.ROLES:
            raise BadExample("unknown_role", f"messages[{i}].role = {m['role']!r}")
        if not allow_empty and not m["content"].strip():
            raise BadExample("bad_message", f"messages[{i}] ({m['role']}) has empty content")
        for sym in CHAT_SYMBOLS:
            if sym in m["content"]:
                raise BadExample("control_token", f"messages[{i}] contains {sym}")
    roles = [m["role"] for m in messages]
    if final_assistant and "assistant" not in roles:
        raise BadExample("no_assistant_turn", f"roles {roles}")
    body = roles[1:] if roles[0] == "system" else roles
    for j, role in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            i = j + (len(roles) - len(body))
            raise BadExample("role_order", f"messages[{i}] is {role}, expected {expected}")
    if not body:
        raise BadExample("role_order", "only a system message")
    last = "assistant" if final_assistant else "user"
    if body[-1] != last:
        raise BadExample("role_order", f"ends with {body[-1]}, expected {last}")
    return messages


def parse_line(line: str, key: str | None = "messages") -> dict:
    """One JSONL line -> its object, raising BadExample for anything but an object (with `key`)."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise BadExample("malformed_json", str(e)) from None
    if not isinstance(obj, dict):
        raise BadExample("malformed_json", f"a JSON {type(obj).__name__}, not an object")
    if key is not None and key not in obj:
        raise BadExample("missing_messages", f"keys {sorted(obj)[:8]}")
    return obj


def encode(messages: list[dict], vocab, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss weights) of a conversation, without BOS (packing puts BOS before each example).

    The template's control pieces and "\\n" are whole tokens, so encoding piece by piece gives the
    same ids as encoding the rendered text (tests check this); that is what lets the mask follow
    the template's trained_on flags exactly.
    """
    ids: list[int] = []
    weights: list[int] = []
    for text, trained in chat_template.segments(messages, add_generation_prompt):
        piece = list(vocab.encode(text))
        ids += piece
        weights += [int(trained)] * len(piece)
    return ids, weights


def check_length(ids: list[int], weights: list[int], seq_len: int) -> None:
    """An example must fit whole: BOS comes from packing, so `seq_len` ids fit in a row."""
    if len(ids) <= seq_len:
        return
    first = weights.index(1) if 1 in weights else len(ids)
    if first >= seq_len:
        raise BadExample("prompt_too_long", f"{first} prompt tokens > {seq_len}")
    raise BadExample("too_long", f"{len(ids)} tokens > {seq_len}")


def prompt_ids(messages: list[dict], vocab) -> list[int]:
    """BOS + the conversation so far + the assistant header: what a model continues from."""
    return [BOS_ID] + encode(messages, vocab, add_generation_prompt=True)[0]


def end_id(vocab) -> int:
    """Id of <|end|>, where an assistant reply stops."""
    piece_id = vocab.tokenizer.piece_to_id(chat_template.END)
    if vocab.tokenizer.id_to_piece(piece_id) != chat_template.END:
        raise ValueError(f"the tokenizer has no {chat_template.END} piece; it cannot serve the chat template")
    return piece_id


def _short(x, n: int = 60) -> str:
    s = json.dumps(x, ensure_ascii=False)
    return s if len(s) <= n else s[:n] + "..."
