"""The exported tokenizer gives exactly the training ids, byte fallback included.

Decoding gives the text back up to the tokenizer's nmt_nfkc normalisation, which is by design
(full-width ＡＢＣ１２３ and half-width ｶﾀｶﾅ come back as ABC123 and カタカナ): the reference is
SentencePiece's own decode of the same ids.
"""

import json

import pytest
import sentencepiece as spm

from kinoe_jax.data.chat.template import render, segments
from kinoe_jax.data.vocab import BOS_ID, BUILTIN_TOKENIZER
from kinoe_jax.hf import tokenizer as tok_lib

HARD = [
    "ひらがなだけのぶんしょう",
    "カタカナノブンショウ",
    "ﾊﾝｶｸｶﾀｶﾅﾃﾞｽ ﾄﾞﾗｲﾌﾞ ﾊﾟﾝ ｳﾞｧｲｵﾘﾝ",   # half-width voiced marks compose (ﾄﾞ -> ド)
    "か\u3099き\u3099ほ\u309aテﾞ",            # decomposed (NFD) kana, as macOS file names have
    "漢字仮名交じり文の例。",
    "𠮷野家の𩸽と龘、鱻を食べた",        # rare kanji outside the vocabulary: byte fallback
    "絵文字😀👍🏽🇯🇵も混ざる",
    "ＡＢＣ１２３と全角記号！？",
    "GPUとTPUでtrainingしたModel v2.5",
    "一行目\n二行目\n\n\n四行目\n",
    " 先頭に空白",
    "  二つの空白で始まり 途中に   三つ",
    "末尾に空白   ",
    "タブ\tと改行\r\nと縦棒|",
    "",
    " ",
    "<|system|>\nあなたは親切です。<|end|>\n<|user|>\nこんにちは<|end|>\n<|assistant|>\n",
    "1234567890円、３４５６円。",
    "「かぎ括弧」『二重』（丸）【隅付き】…‥",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok_lib.export(BUILTIN_TOKENIZER, str(out), model_max_length=512)
    (out / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    return out


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=BUILTIN_TOKENIZER)


@pytest.fixture(scope="module")
def fast_tokenizers(exported):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    return {"AutoTokenizer": AutoTokenizer.from_pretrained(exported),
            "PreTrainedTokenizerFast": PreTrainedTokenizerFast.from_pretrained(exported)}


def test_training_ids_are_sentencepiece_ids(sp):
    from kinoe_jax.data.vocab import get_vocabulary

    vocab = get_vocabulary()  # what the seqio pipeline encodes with
    for text in HARD:
        assert list(vocab.encode(text)) == sp.encode(text), text


def test_hard_strings_exercise_byte_fallback_and_normalisation(sp):
    byte_ids = {i for i in range(sp.get_piece_size()) if sp.is_byte(i)}
    assert any(set(sp.encode(t)) & byte_ids for t in HARD)
    assert sp.decode(sp.encode("ＡＢＣ１２３ｶﾀｶﾅ")) == "ABC123カタカナ"


@pytest.mark.parametrize("name", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_fast_tokenizer_matches_training(fast_tokenizers, sp, name):
    tok = fast_tokenizers[name]
    for text in HARD:
        ids = tok(text)["input_ids"]
        assert ids == [BOS_ID] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)), text
    # Texts NFKC leaves alone come back exactly.
    for text in ["日本語の文。\n  二行目 ", "𠮷野家😀", " 先頭"]:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_random_japanese_strings_match(fast_tokenizers, sp):
    """Fuzz over the scripts Japanese text mixes, in composed and decomposed form."""
    import random
    import unicodedata

    tok = fast_tokenizers["AutoTokenizer"]
    blocks = [(0x3041, 0x3096), (0x3099, 0x309F), (0x30A0, 0x30FF), (0xFF61, 0xFF9F), (0xFF01, 0xFF5E),
              (0x4E00, 0x9FFF), (0x3000, 0x303F), (0x20, 0x7E), (0x1F300, 0x1F64F), (0x2460, 0x2473),
              (0x3200, 0x32FF), (0x3300, 0x3357), (0x20000, 0x2A6DF), (0xF900, 0xFA6D), (0x0A, 0x0A)]
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 20)))
        for variant in (text, unicodedata.normalize("NFD", text)):
            assert tok(variant)["input_ids"] == [BOS_ID] + sp.encode(variant), ascii(variant)


def test_special_tokens_and_ids(fast_tokenizers, sp):
    tok = fast_tokenizers["AutoTokenizer"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, 3)
    from kinoe_jax.data import vocab

    assert tok_lib.KINOE_IDS == {"pad": vocab.PAD_ID, "eos": vocab.EOS_ID, "unk": vocab.UNK_ID, "bos": vocab.BOS_ID}
    assert len(tok) == sp.get_piece_size()
    for i in range(sp.get_piece_size()):
        if not (sp.is_byte(i) or sp.is_control(i)):
            assert tok.convert_ids_to_tokens(i) == sp.id_to_piece(i)


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_gives_sft_ids(fast_tokenizers, sp, generation_prompt):
    tok = fast_tokenizers["AutoTokenizer"]
    messages = [{"role": "system", "content": "丁寧に答えてください。"},
                {"role": "user", "content": "富士山の高さは？"},
                {"role": "assistant", "content": "3776 mです。"},
                {"role": "user", "content": "ありがとう😀"}]
    got = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                  return_dict=False)
    sft = [BOS_ID] + [i for text, _ in segments(messages, generation_prompt) for i in sp.encode(text)]
    assert got == sft
    assert got == [BOS_ID] + sp.encode(render(messages, generation_prompt))


def test_sentencepiece_backed_loader_encodes_training_ids(exported, sp):
    """transformers 5's SentencePiece-backed tokenizer (what the slow LlamaTokenizer became) reads
    tokenizer.model with legacy=True and no prefix space: the same pieces as training."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    slow = SentencePieceBackend.from_pretrained(exported)
    assert slow.legacy is True
    for text in HARD:
        assert slow.convert_tokens_to_ids(slow.tokenize(text)) == sp.encode(text), text


def test_refuses_a_dummy_prefix_tokenizer(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(open(BUILTIN_TOKENIZER, "rb").read())
    proto.normalizer_spec.add_dummy_prefix = True
    path = tmp_path / "prefix.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(tok_lib.ConversionError, match="add_dummy_prefix"):
        tok_lib.export(str(path), str(tmp_path), 64)
