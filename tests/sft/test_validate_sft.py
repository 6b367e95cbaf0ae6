"""tools/validate_sft.py: the shipped sets pass; poems that do not scan, schema errors, long
examples and near duplicates inside or across sets fail with file:line."""

import copy
import json
import os

import pytest

from paths import REPO
from tools import validate_sft

from kinoe_jax.sft import mora

pytest.importorskip("fugashi")
SFT_DIR = os.path.join(REPO, "kinoe_jax", "data", "builtin", "sft")


def _rows(name):
    with open(os.path.join(SFT_DIR, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("text, morae", [
    ("会議中", 5), ("烏龍茶", 5), ("握ってた", 5), ("始業式", 5), ("キーボード", 5), ("通勤が", 5),
    ("なくて歩数は", 7), ("ちゅうしゃじょう", 5), ("ジャンプ!", 3), ("「まだ着かない?」", 6),
])
def test_mora_counts(text, morae):
    assert mora.count_line(text) == morae


def test_reading_overrides_fix_misread_words():
    assert mora.count_line("給料日") == 6  # the analyser reads 日 as ニチ here
    assert mora.count_line("給料日", {"給料日": "きゅうりょうび"}) == 5
    assert mora.count_line("塗れない背中", {"塗れ": "ぬれ"}) == 7
    with pytest.raises(mora.ReadingError, match="no reading for"):
        mora.count_line("Wi-Fiが")
    assert mora.count_line("Wi-Fiが", {"Wi-Fi": "わいふぁい"}) == 5


def test_the_shipped_sets_pass(tmp_path, capsys):
    report = tmp_path / "report.json"
    assert validate_sft.main([f"--json={report}"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("OK")
    data = json.loads(report.read_text(encoding="utf-8"))
    kinds = {os.path.basename(f["path"]): f["kind"] for f in data["files"]}
    assert kinds == {"senryu.jsonl": "senryu", "listening_a.jsonl": "chat", "listening_b.jsonl": "chat",
                     "preference.jsonl": "preference", "mt_bench_ja_questions.jsonl": "mt_bench"}
    senryu = next(f for f in data["files"] if f["kind"] == "senryu")
    assert senryu["ok"] == 200 and not senryu["errors"]
    # Deliberate jiamari are listed by file:line and id.
    assert [j.split(" ")[1] for j in senryu["jiamari"]] == ["senryu-180:", "senryu-183:"]
    assert all(not f["errors"] and not f["warnings"] for f in data["files"])
    assert data["near_duplicate_pairs"] == []


def test_bad_items_fail_with_file_and_line(tmp_path, capsys):
    senryu = _rows("senryu.jsonl")[:8]
    bad = copy.deepcopy(senryu)
    # 1: a 5-7-8 poem (the reply changed to match) that is not marked jiamari
    bad[1]["senryu"][2] = bad[1]["senryu"][2] + "ですよね"
    bad[1]["messages"][1]["content"] = "\n".join(bad[1]["senryu"])
    # 2: marked jiamari but an exact 5-7-5
    bad[2]["jiamari"] = True
    # 3: lines that are not the poem in the reply
    bad[3]["senryu"] = ["あいうえお", "かきくけこさし", "たちつてと"]
    # 4: a short line (字足らず), even though jiamari is allowed
    bad[4]["senryu"][0] = "ねこ"
    bad[4]["messages"][1]["content"] = "\n".join(bad[4]["senryu"])
    bad[4]["jiamari"] = True
    # 5: the same id twice
    bad[5]["id"] = bad[0]["id"]
    # 6: an assistant turn missing
    bad[6]["messages"] = bad[6]["messages"][:1]
    s_path = _write(tmp_path / "senryu.jsonl", bad)

    listening = _rows("listening_a.jsonl")[:3]
    copied = copy.deepcopy(listening[0])  # a near copy of another set's item
    copied["id"] = "copy-1"
    copied["messages"][1]["content"] = copied["messages"][1]["content"].replace("。", "!", 1)
    l_path = _write(tmp_path / "listening.jsonl", listening)
    c_path = _write(tmp_path / "more.jsonl", [copied, *_rows("listening_b.jsonl")[:5]])
    q = _rows("mt_bench_ja_questions.jsonl")[:2]
    q[1]["turns"] = q[1]["turns"][:1]
    q_path = _write(tmp_path / "questions.jsonl", q)

    assert validate_sft.main([s_path, l_path, c_path, q_path, "--seq_len=1024"]) == 1
    out = capsys.readouterr().out
    for line, reason in [(2, "not_575"), (3, "jiamari_flag"), (4, "senryu_mismatch"), (5, "jitarazu"),
                         (6, "duplicate_id"), (7, "no_assistant_turn")]:
        assert f"ERROR {s_path}:{line}: {reason}" in out, reason
    assert f"ERROR {q_path}:2: mt_bench_schema" in out
    assert f"pair {c_path}:1 ~ {l_path}:1" in out
    assert "ERROR more repeats listening at rate" in out
    assert out.rstrip().endswith("FAILED")

    # Conversations longer than --seq_len are errors (training would skip them).
    assert validate_sft.main([l_path, "--seq_len=64"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {l_path}:1: prompt_too_long" in out or f"ERROR {l_path}:1: too_long" in out
