"""hojichar's filters and personal-information masking in tools/prepare_corpus.py.

The documents are this project's own writing: each ordinary text trips one
of hojichar's keyword lists only when that filter is switched on (or, for
the schedule, only without the katakana word boundary), which is what the
defaults in default_config.yaml are about.
"""

import gzip
import json
from pathlib import Path

import pytest

from kinoe_jax.corpus import cli

# A childhood quarrel (喧嘩 is on hojichar's violence list).
QUARREL = ("小さいころ、弟とはよく喧嘩をしました。おやつの大きさや、テレビのチャンネルをめぐって言い合いになり、最後には"
           "母に二人そろって叱られるのがいつもの流れでした。大人になった今では、あのころのことを笑い話にしながら、"
           "年に何度か一緒に食事をしています。あれほど言い争っていたのに、いちばん気の合う相手になったのが不思議です。"
           "子どもたちが喧嘩をしていると、つい昔の自分たちを思い出します。仲直りの仕方を覚えることも、きっと"
           "大切な経験なのでしょう。")
# Grumbling to a friend (愚痴 holds 痴, an entry of the adult list).
GRUMBLE = ("仕事帰りに古い友人と駅前の喫茶店で会い、最近の出来事をあれこれ話しました。職場の人間関係について、つい愚痴を"
           "こぼしてしまいましたが、友人は急かさずに最後まで聞いてくれました。帰り道には気持ちがずいぶん軽くなり、"
           "話を聞いてもらえるだけで人は元気になれるのだと感じました。次は私が聞き役になろうと思います。別れ際に、"
           "来月は郊外の美術館へ一緒に出かける約束をしました。季節の花が見られる庭もあるそうなので、今から楽しみです。")
# A training schedule (スケ, inside スケジュール, is on the discrimination list).
SCHEDULE = ("来週の研修のスケジュールが決まりました。初日は午前中に会社の歴史と仕事の流れを学び、午後は先輩社員と一緒に"
            "現場を見て回ります。二日目からは少人数のグループに分かれて、実際の資料を使いながら練習を重ねる予定です。"
            "わからないことがあれば、その場で遠慮なく質問してください。最終日には、三日間で学んだことを一人ずつ発表してもらいます。"
            "持ち物は筆記用具と社員証だけで、昼食は会社で用意します。初日は少し早めに集まってください。")
# A neighbourhood notice whose contact details come at the very end, far
# beyond the opening characters a report example shows.
NOTICE = ("町内会からのお知らせです。来月の第二日曜日の朝九時から、公民館の大掃除を行います。窓ふきや床のワックスがけ、"
          "物置の整理など、作業はたくさんありますので、ご家族そろってのご参加を歓迎します。軍手とぞうきんは町内会で"
          "用意しますが、使い慣れた道具があればお持ちください。作業のあとには、集会室で温かい豚汁をふるまう予定です。"
          "雨天の場合も、屋内の作業だけは予定どおり行います。当日の連絡先は、会長の携帯 090-2468-1357 と、副会長の"
          "自宅 045-987-6543 です。メールでのご連絡は kouminkan.souji@example.ne.jp へお願いします。")
SECRETS = ("1357", "6543", "2222", "kouminkan", "yamada", "example.ne.jp", "example.com")


def run(tmp_path: Path, lines: list[str], config: str = "", name: str = "out") -> tuple[int, dict, list[dict]]:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = [f"--input={src}", f"--output_dir={tmp_path / name}", "--num_workers=1", "--no_progress"]
    if config:
        (tmp_path / f"{name}.yaml").write_text(config, encoding="utf-8")
        args.append(f"--config={tmp_path / name}.yaml")
    code = cli.main(args)
    out = tmp_path / name
    if code != 0:
        return code, {}, []
    records = []
    for shard in sorted(out.glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return code, json.loads((out / "report.json").read_text(encoding="utf-8")), records


def doc(text: str, doc_id: str) -> str:
    return json.dumps({"id": doc_id, "text": text}, ensure_ascii=False)


ORDINARY = [doc(QUARREL, "quarrel"), doc(GRUMBLE, "grumble"), doc(SCHEDULE, "schedule")]


def test_defaults_keep_ordinary_text(tmp_path):
    code, report, records = run(tmp_path, ORDINARY)
    assert code == 0
    assert [r["id"] for r in records] == ["quarrel", "grumble", "schedule"]
    # Off by default: no counter, rather than a 0 that would read "ran, found nothing".
    assert not {"discrimination_content", "violence_content", "adult_content"} & set(report["removed"])


def test_switched_on_filters_are_counted_in_order(tmp_path):
    code, report, records = run(tmp_path, ORDINARY, "filters:\n  violence_content: true\n  adult_content: true\n")
    assert code == 0
    assert [r["id"] for r in records] == ["schedule"]
    removed = report["removed"]
    assert list(removed)[-4:] == ["violence_content", "adult_content", "exact_duplicate", "near_duplicate"]
    assert (removed["violence_content"], removed["adult_content"]) == (1, 1)
    assert report["examples"]["violence_content"][0]["source"].endswith("in.jsonl:1")
    assert report["examples"]["adult_content"][0]["source"].endswith("in.jsonl:2")


def test_katakana_keyword_boundary(tmp_path):
    code, report, records = run(tmp_path, ORDINARY,
                                "filters:\n  discrimination_content: true\n  katakana_keyword_boundary: false\n")
    assert code == 0
    assert [r["id"] for r in records] == ["quarrel", "grumble"]
    assert report["removed"]["discrimination_content"] == 1


def test_personal_information_is_masked_counted_and_never_shown(tmp_path):
    lines = [
        doc(NOTICE, "notice"),
        doc("お問い合わせは 06-1111-2222 まで。", "short"),  # too_short, with a phone number
        '{"text": "連絡先は yamada.hanako@example.com です',  # invalid_json, with an address
        doc(SCHEDULE, "schedule"),
    ]
    code, report, records = run(tmp_path, lines)
    assert code == 0
    assert [r["id"] for r in records] == ["notice", "schedule"]
    notice = records[0]["text"]
    assert "090-2468-XXXX" in notice and "045-987-XXXX" in notice and "xxxx@yyy.jp" in notice
    assert report["pii"] == {"documents_masked": 1, "phone_numbers": 2, "email_addresses": 1}
    shown = report["examples"]["pii_masked"]
    assert [e["source"].rsplit(":", 1)[1] for e in shown] == ["1"]
    # The example is taken around the first mask, not from the opening.
    assert "090-2468-XXXX" in shown[0]["text"]
    assert "06-1111-XXXX" in report["examples"]["too_short"][0]["text"]
    assert "xxxx@yyy.com" in report["examples"]["invalid_json"][0]["text"]
    everything = (tmp_path / "out" / "report.json").read_text(encoding="utf-8") + json.dumps(records)
    for secret in SECRETS:
        assert secret not in everything, secret


def test_masking_can_be_switched_off(tmp_path):
    code, report, records = run(tmp_path, [doc(NOTICE, "notice")], "pii:\n  mask: false\n")
    assert code == 0
    assert "pii" not in report and "pii_masked" not in report["examples"]
    assert "090-2468-1357" in records[0]["text"]


@pytest.mark.parametrize("config, message", [
    ("filters:\n  violence_content: yes please\n", "filters.violence_content must be true or false"),
    ("filters:\n  max_ad_keywords: -1\n", "filters.max_ad_keywords must be a whole number"),
    ("pii:\n  mask: 1\n", "pii.mask must be true or false"),
    ("pii:\n  masks: true\n", "unknown key pii.masks"),
    ("dedup:\n  rows_per_band: 65\n", "dedup.rows_per_band must be in 1..64"),
    ("dedup:\n  candidate_recall: 1.0\n", "dedup.candidate_recall must be in (0, 1)"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, config, message):
    code, _, _ = run(tmp_path, ORDINARY, config)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()
