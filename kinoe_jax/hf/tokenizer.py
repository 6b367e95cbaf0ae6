"""The SentencePiece tokenizer as HF files that give exactly the training ids.

Training encodes with SentencePiece itself (unigram, nmt_nfkc, byte fallback, no dummy prefix,
whitespace kept) and puts BOS first. The export writes:
  tokenizer.model        the SentencePiece model as trained;
  tokenizer.json         a `tokenizers` pipeline built from that model's own pieces, scores and
                         normalisation table (no dummy-prefix Metaspace, no whitespace stripping),
                         with byte fallback on, user-defined symbols as never-split added tokens
                         and BOS prepended, so the fast tokenizer reproduces SentencePiece;
  tokenizer_config.json  PreTrainedTokenizerFast (the class that loads tokenizer.json verbatim in
                         transformers 4 and 5), the special tokens, legacy=True/add_prefix_space=
                         False for SentencePiece-backed loaders, and the chat template.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import unicodedata

from sentencepiece import sentencepiece_model_pb2 as pb

from kinoe_jax.data.chat.template import END, JINJA
from kinoe_jax.hf.mapping import ConversionError

# kinoe_jax.data.vocab's fixed ids, repeated (and tested equal) because importing that package
# loads TensorFlow, which a converter has no use for.
KINOE_IDS = {"pad": 0, "eos": 1, "unk": 2, "bos": 3}
# sentencepiece ModelProto piece types.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6


def load_proto(path: str):
    if not os.path.exists(path):
        raise ConversionError(f"tokenizer model {path} does not exist")
    proto = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ConversionError(f"{path}: not a SentencePiece model ({e})") from e
    if not proto.pieces:
        raise ConversionError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def special_ids(proto) -> dict[str, int]:
    t = proto.trainer_spec
    return {"pad": t.pad_id, "eos": t.eos_id, "unk": t.unk_id, "bos": t.bos_id}


def stop_ids(proto) -> list[int]:
    """EOS plus the chat template's end-of-turn piece, so HF generate stops after a reply."""
    ids = [proto.trainer_spec.eos_id]
    ids += [i for i, p in enumerate(proto.pieces) if p.piece == END]
    return ids


def _piece(proto, i: int) -> str:
    return proto.pieces[i].piece


def check_supported(proto, path: str) -> None:
    problems = []
    if proto.trainer_spec.model_type != 1:  # UNIGRAM
        problems.append(f"model_type {proto.trainer_spec.model_type} (only unigram is exported)")
    if proto.normalizer_spec.add_dummy_prefix:
        problems.append("add_dummy_prefix=True (kinoe tokenizers are trained without it)")
    if proto.normalizer_spec.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=True (not reproduced by the exported fast tokenizer)")
    if min(special_ids(proto).values()) < 0:
        problems.append(f"a special id is disabled ({special_ids(proto)}); BOS/EOS/PAD/UNK are all required")
    if problems:
        raise ConversionError(f"{path}: cannot export this tokenizer exactly: " + "; ".join(problems))


# Kana voicing marks: combining (U+3099/309A) and half-width (ﾞ ﾟ).
_VOICING_MARKS = frozenset("\u3099\u309a\uff9e\uff9f")


class _Charsmap:
    """Exact lookups in a SentencePiece precompiled normalisation table.

    The table is a darts-clone double-array trie over UTF-8 input followed by the NUL-terminated
    outputs.
    """

    def __init__(self, blob: bytes):
        (size,) = struct.unpack("<I", blob[:4])
        self.units = struct.unpack(f"<{size // 4}I", blob[4:4 + size])
        self.outputs = blob[4 + size:]

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def get(self, key: str) -> str | None:
        pos, unit = 0, self.units[0]
        for byte in key.encode("utf-8"):
            pos ^= self._offset(unit) ^ byte
            if pos >= len(self.units):
                return None
            unit = self.units[pos]
            if unit & ((1 << 31) | 0xFF) != byte:
                return None
        if not (unit >> 8) & 1:  # no value at this node
            return None
        start = self.units[pos ^ self._offset(unit)] & ((1 << 31) - 1)
        return self.outputs[start:self.outputs.index(b"\0", start)].decode("utf-8")


def _voicing_rules(blob: bytes) -> list[tuple[str, str]]:
    """The table's own kana + voicing mark rules (ﾄﾞ -> ド, か\u3099 -> が).

    `tokenizers`' port of the SentencePiece normaliser looks a character sequence up whole only
    when it is shorter than 6 UTF-8 bytes, and every kana + mark pair is exactly 6: without these
    explicit rules half-width ﾃﾞ and decomposed (NFD) kana would not compose as in training.
    Candidates are the characters that compose with a voicing mark under NFKC.
    """
    table = _Charsmap(blob)
    rules = []
    for c in _voicing_bases():
        for mark in sorted(_VOICING_MARKS):
            out = table.get(c + mark)
            if out is not None:
                rules.append((c + mark, out))
    return rules


@functools.lru_cache(maxsize=1)
def _voicing_bases() -> tuple[str, ...]:
    out = []
    for code in range(0x110000):
        if 0xD800 <= code < 0xE000:
            continue
        c = chr(code)
        # Only kana compose with a mark as they are; anything else must first decompose to one.
        if not (0x3040 <= code <= 0x30FF or unicodedata.decomposition(c)):
            continue
        if any(len(unicodedata.normalize("NFKC", c + m)) == 1 for m in ("\u3099", "\u309a")):
            out.append(c)
    return tuple(out)


def build_fast(proto):
    """A `tokenizers.Tokenizer` that segments like SentencePiece for this model."""
    # optional: the hf extra
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors  # noqa: PLC0415
    from tokenizers.models import Unigram  # noqa: PLC0415

    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = Tokenizer(Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    steps = []
    charsmap = proto.normalizer_spec.precompiled_charsmap
    if charsmap:
        steps += [normalizers.Replace(k, v) for k, v in _voicing_rules(charsmap)]
        steps.append(normalizers.Precompiled(charsmap))
    if proto.normalizer_spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # SentencePiece never splits user-defined symbols (\n, 。, 、, chat control pieces) and matches
    # them before normalisation: exactly what an un-normalised added token does.
    specials = [AddedToken(p.piece, special=True, normalized=False)
                for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)]
    users = [AddedToken(p.piece, special=False, normalized=False)
             for p in proto.pieces if p.type == _USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(users)
    bos_id = proto.trainer_spec.bos_id
    bos = _piece(proto, bos_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])
    return tok


def tokenizer_config(proto, model_max_length: int, chat_template: str) -> dict:
    ids = special_ids(proto)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _piece(proto, ids["bos"]),
        "eos_token": _piece(proto, ids["eos"]),
        "unk_token": _piece(proto, ids["unk"]),
        "pad_token": _piece(proto, ids["pad"]),
        "add_bos_token": True,
        "add_eos_token": False,
        # SentencePiece-backed loaders: encode each chunk as is (no prefix '▁', nothing stripped).
        "legacy": True,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }


def export(model_path: str, out_dir: str, model_max_length: int) -> dict[str, int]:
    """Write the tokenizer files into out_dir; returns the special ids for config.json."""
    proto = load_proto(model_path)
    check_supported(proto, model_path)
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    build_fast(proto).save(os.path.join(out_dir, "tokenizer.json"))
    ids = special_ids(proto)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(proto, model_max_length, JINJA), f, ensure_ascii=False, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k + "_token": _piece(proto, v) for k, v in ids.items()}, f, ensure_ascii=False, indent=2)
    return ids
