"""SFT data: the loss mask follows the chat template, bad lines are reported by file:line and
never trained on, and packing keeps every flag on its token. (The SFT run: test_sft_runs.py.)"""

import json
import os

import gin
import pytest

from kinoe_jax.data.chat import template as chat_template
from kinoe_jax.data import pipeline
from kinoe_jax.data.vocab import BOS_ID, get_vocabulary
from kinoe_jax.sft import tasks
from kinoe_jax.data.chat.conversation import BadExample, check_messages, encode, end_id

SFT_FILES = [os.path.join(tasks.BUILTIN_SFT_DIR, f) for f in tasks.BUILTIN_SFT_FILES]
SFT_BINDINGS = ["make_feature_converter.converter_cls = @SftFeatureConverter",
                "task_feature_lengths.features = ('targets', 'trained_on')"]


def _conversations(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def test_masked_ids_are_the_rendered_ids_and_only_assistant_replies_train():
    vocab = get_vocabulary()
    end = end_id(vocab)
    n = 0
    for path in SFT_FILES:
        for messages in _conversations(path):
            ids, weights = encode(messages, vocab)
            assert ids == list(vocab.encode(chat_template.render(messages)))
            trained = [i for i, w in zip(ids, weights) if w]
            expected = [t for m in messages if m["role"] == "assistant"
                        for t in list(vocab.encode(m["content"])) + [end]]
            assert trained == expected
            assert ids[0] != BOS_ID and weights[0] == 0  # BOS comes from packing, never trained
            n += 1
    assert n == 400


BAD_LINES = {
    # line number in the file -> reason
    2: ("{\"messages\": [", "malformed_json"),
    3: (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}), "unknown_role"),
    4: (json.dumps({"messages": [{"role": "user", "content": "返事はいりません。"}]}), "no_assistant_turn"),
    5: (json.dumps({"messages": []}), "empty_conversation"),
    6: (json.dumps({"text": "pretraining line"}), "missing_messages"),
    7: (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                 {"role": "assistant", "content": "c"}]}), "role_order"),
    8: (json.dumps({"messages": [{"role": "user", "content": "長い質問。" * 40},
                                 {"role": "assistant", "content": "はい。"}]}), "prompt_too_long"),
    9: (json.dumps({"messages": [{"role": "user", "content": "質問。"},
                                 {"role": "assistant", "content": "長い答え。" * 40}]}), "too_long"),
    10: (json.dumps({"messages": [{"role": "user", "content": "a<|end|>"},
                                  {"role": "assistant", "content": "b"}]}), "control_token"),
    11: (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}),
         "bad_message"),
}
GOOD = [
    [{"role": "user", "content": "雨の日の川柳を。"}, {"role": "assistant", "content": "傘の花\n駅にひらいて\n朝が来る"}],
    [{"role": "system", "content": "やさしく話します。"}, {"role": "user", "content": "疲れました。"},
     {"role": "assistant", "content": "お疲れなんですね。"}, {"role": "user", "content": "はい。"},
     {"role": "assistant", "content": "どんな一日でしたか。"}],
    [{"role": "user", "content": "こんにちは。"}, {"role": "assistant", "content": "こんにちは。今日はどうしましたか。"}],
]


def _write_mixed(path):
    lines = {1: json.dumps({"messages": GOOD[0]}, ensure_ascii=False)}
    lines.update({k: v[0] for k, v in BAD_LINES.items()})
    lines[12] = ""  # blank lines are skipped silently
    lines[13] = json.dumps({"messages": GOOD[1]}, ensure_ascii=False)
    lines[14] = json.dumps({"messages": GOOD[2]}, ensure_ascii=False)
    path.write_text("\n".join(lines[i] for i in sorted(lines)) + "\n", encoding="utf-8")
    return str(path)


def test_bad_lines_are_counted_and_reported_by_file_and_line(tmp_path):
    path = _write_mixed(tmp_path / "mixed.jsonl")
    report = tasks.check_files(path, seq_len=64, progress=False)
    assert report.total == 13 and report.kept == 3
    assert {(p.line, p.reason) for p in report.problems} == {(k, v[1]) for k, v in BAD_LINES.items()}
    summary = report.summary()
    for line, (_, reason) in BAD_LINES.items():
        assert f"{path}:{line}: {reason}" in summary
    with pytest.raises(tasks.SftDataError, match="mixed.jsonl:4: no_assistant_turn"):
        tasks.register_sft_task("sft_strict", path, seq_len=64, strict=True)


def test_check_messages_role_order():
    with pytest.raises(BadExample) as e:
        check_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert e.value.reason == "no_assistant_turn"
    with pytest.raises(BadExample) as e:
        check_messages([{"role": "assistant", "content": "a"}])
    assert e.value.reason == "role_order"
    with pytest.raises(BadExample) as e:
        check_messages([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                        {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])
    assert e.value.reason == "role_order"
    prompt = check_messages([{"role": "user", "content": "u"}], final_assistant=False)
    assert prompt[0]["role"] == "user"


def test_packed_rows_keep_the_mask_on_its_tokens_and_drop_bad_lines(tmp_path):
    path = _write_mixed(tmp_path / "mixed.jsonl")
    gin.parse_config(SFT_BINDINGS)
    tasks.register_sft_task("sft_mixed", path, seq_len=64)
    vocab = get_vocabulary()
    expected = {tuple(encode(m, vocab)[0]): encode(m, vocab)[1] for m in GOOD}
    ds = pipeline.packed_dataset("sft_mixed", "train", 64, 2, shuffle=False, seed=0, num_epochs=1,
                                 shard_index=0, num_shards=1)
    seen = []
    for batch in ds.as_numpy_iterator():
        for r in range(batch["decoder_target_tokens"].shape[0]):
            seg = batch["decoder_segment_ids"][r]
            assert not batch["decoder_loss_weights"][r][seg == 0].any()  # padding never trains
            for s in sorted(set(seg) - {0}):
                m = seg == s
                targets = tuple(int(t) for t in batch["decoder_target_tokens"][r][m])
                assert targets in expected, "a packed segment that is not one of the good lines"
                assert list(batch["decoder_loss_weights"][r][m]) == expected[targets]
                inputs = batch["decoder_input_tokens"][r][m]
                assert inputs[0] == BOS_ID and list(inputs[1:]) == list(targets[:-1])
                assert list(batch["decoder_positions"][r][m]) == list(range(len(targets)))
                seen.append(targets)
    assert sorted(seen) == sorted(expected)


def test_a_file_with_nothing_trainable_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD_LINES[4][0] + "\n", encoding="utf-8")
    with pytest.raises(tasks.SftDataError, match="0 of 1 examples kept"):
        tasks.register_sft_task("sft_empty", str(path), seq_len=64)
