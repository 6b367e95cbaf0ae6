"""The chat template exported with the HF tokenizer gives exactly the SFT training ids:
transformers' apply_chat_template on every built-in conversation equals what the SFT pipeline
encodes (and, with add_generation_prompt, what kinoe_jax.generate --chat feeds the model)."""

import json
import os

import pytest

from kinoe_jax.data.vocab import BOS_ID, BUILTIN_TOKENIZER, get_vocabulary
from kinoe_jax.sft import tasks
from kinoe_jax.data.chat.conversation import encode, prompt_ids

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from kinoe_jax.hf import tokenizer as tok_lib

    out = tmp_path_factory.mktemp("hf_tok")
    tok_lib.export(BUILTIN_TOKENIZER, str(out), model_max_length=512)
    with open(out / "config.json", "w") as f:
        json.dump({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, f)
    return AutoTokenizer.from_pretrained(str(out))


def _all_conversations():
    for name in tasks.BUILTIN_SFT_FILES:
        with open(os.path.join(tasks.BUILTIN_SFT_DIR, name), encoding="utf-8") as f:
            yield from (json.loads(line)["messages"] for line in f if line.strip())
    with open(os.path.join(tasks.BUILTIN_SFT_DIR, "preference.jsonl"), encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            for reply in (pair["chosen"], pair["rejected"]):
                yield pair["prompt"] + [{"role": "assistant", "content": reply}]


def test_apply_chat_template_gives_the_sft_training_ids(hf_tokenizer):
    vocab = get_vocabulary()
    n = 0
    for messages in _all_conversations():
        got = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(got) == [BOS_ID] + encode(messages, vocab)[0], messages[0]["content"][:40]
        # The prompt the model answers from: everything before the last reply, plus the header.
        prompt = hf_tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                  return_dict=False)
        assert list(prompt) == prompt_ids(messages[:-1], vocab)
        n += 1
    assert n == 400 + 2 * 60
