"""Tests of the corpus cleaning tool (tools/prepare_corpus.py).

The fixtures are small hand-written documents, each built to trip exactly
one filter (ours or hojichar's), plus duplicates, personal information and
broken input lines, so every count in the report can be asserted exactly.
"""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from paths import REPO

from kinoe_jax.corpus import cli, local_runner
from kinoe_jax.corpus.filters import normalize_text


# --- documents that pass every filter --------------------------------------
D1 = ("秋の京都は、紅葉を目当てに訪れる人でとても賑わいます。朝早くに嵐山へ向かうと、まだ観光客が少なく、"
      "川霧の向こうに色づいた山がゆっくりと姿を現します。渡月橋を渡ったあとは、竹林の小道を抜けて小さなお寺に"
      "立ち寄るのがおすすめです。境内のもみじは十一月の半ばに見頃を迎え、晴れた日には池の水面に赤と黄色の葉が"
      "映り込みます。昼食には湯豆腐を出す店が多く、冷えた体がじんわりと温まります。帰りは混雑を避けて、"
      "少し早めに駅へ向かうとよいでしょう。")
D2 = ("ベランダでミニトマトを育て始めて三年目になります。最初の年は水をやりすぎて根を傷めてしまい、実がほとんど"
      "なりませんでした。二年目からは土の表面が乾いてからたっぷり与えるようにしたところ、夏の終わりまで次々に"
      "赤い実がつきました。わき芽をこまめに摘むこと、支柱をしっかり立てることも大切です。今年は肥料の量を少し"
      "減らして、甘さがどう変わるかを確かめています。収穫したトマトは、そのまま食べても、オリーブ油と塩で"
      "和えてもおいしいです。")
D3 = ("プログラミングを独学で身につけるには、小さな目標を決めて毎日少しずつ手を動かすことが近道です。\n"
      "教科書を最初から最後まで読もうとすると、途中で疲れてしまうことがよくあります。それよりも、作りたいものを"
      "一つ決めて、わからないところが出てきたらその都度調べるほうが記憶に残ります。\n"
      "エラーが出たときは、表示された文をよく読んで、どの行で何が起きたのかを確かめましょう。動いたときの喜びが、"
      "次の一歩を踏み出す力になります。")
D4 = ("駅前の図書館が改装を終えて、先月から再び開館しました。以前は薄暗かった閲覧室に大きな窓が設けられ、"
      "午後になるとやわらかな光が机の上に差し込みます。子ども向けの絵本の棚は低く作り直され、小さな子でも"
      "自分で本を選べるようになりました。館内には静かに話せる学習室もあり、平日の夕方には中学生や高校生が"
      "集まって宿題に取り組んでいます。貸出の手続きは機械で行えるので、待ち時間もほとんどありません。"
      "週末には読み聞かせの会も開かれています。")
D5 = ("我が家の猫は、毎朝六時になると決まって枕元にやって来て、小さな声で鳴きます。ごはんの時間を知らせて"
      "いるのだと思いますが、休日くらいはもう少し寝かせてほしいものです。日中はたいてい窓辺の日だまりで丸くなり、"
      "外を通る鳥をじっと目で追っています。夜になると急に元気になり、廊下を端から端まで走り回ります。"
      "気まぐれなところもありますが、疲れて帰った日にそっと膝に乗ってくれると、一日の疲れがすっと消えていく"
      "ように感じます。")
D6 = ("今年の夏祭りは８月２０日と２１日の二日間、駅前の商店街で開かれます。昼間は子ども神輿が通りを練り歩き、"
      "夕方からは盆踊りの輪が広場いっぱいに広がります。屋台では焼きそばやかき氷のほか、地元の農家が育てた"
      "野菜も販売される予定です。雨が降った場合は、翌週の土曜日に延期となります。ごみは各自で持ち帰るか、"
      "会場に設けられた分別用の箱に捨ててください。みなさんのご参加を心よりお待ちしています。"
      "当日は混雑が予想されますので、電車やバスをご利用ください。")
D6_ASCII = D6.replace("８月２０日と２１日", "8月20日と21日")
# A long document and two copies with a few words changed (Jaccard of the
# 5-gram sets about 0.93: near-duplicates).
LONG = ("私たちの町を流れる川は、古くから人々の暮らしを支えてきました。江戸時代には、上流の村で作られた米や炭が"
        "小舟に積まれ、この川を下って港まで運ばれていたそうです。川沿いには船着き場や問屋が並び、町は物資の集まる"
        "場所として栄えました。明治に入って鉄道が通ると、舟による運送は少しずつ姿を消していきましたが、川は今でも"
        "田畑をうるおす大切な水源です。\n昭和の中ごろには工場の排水で水が濁り、魚がほとんど見られなくなった時期も"
        "ありました。その後、住民が中心となって清掃活動を続け、下水道の整備も進んだことで、川はしだいに元の姿を"
        "取り戻しました。いまでは初夏になるとホタルが飛び交い、週末には川原で水遊びをする家族の姿が見られます。\n"
        "毎年秋には、川の歴史を学ぶための散策会が開かれ、地元の年配の方々が昔の船着き場の跡や、洪水の記録が"
        "刻まれた石碑を案内してくれます。参加した子どもたちは、祖父母の世代が見てきた川の風景を知り、自分たちの"
        "町への関心を深めていきます。川を守る取り組みは、これからも世代を越えて受け継がれていくことでしょう。")
NEAR1 = LONG.replace("江戸時代", "江戸の頃").replace("ホタル", "蛍").replace("毎年秋", "毎年十月")
NEAR2 = LONG.replace("清掃活動", "清掃作業").replace("散策会", "見学会").replace("石碑", "石の碑")
# Mentions two listed words five times: kept by default, dropped when the
# word list is configured.
WORDS = ("最近はオンラインカジノや副業の広告をよく見かけます。カジノで簡単に稼げる、副業で月に百万円といった"
         "言葉が並んでいますが、うまい話には必ず裏があると考えたほうがよいでしょう。個人情報を入力する前に、"
         "運営している会社の所在地や連絡先をきちんと確かめることが大切です。少しでも怪しいと感じたら、家族や"
         "消費生活センターに相談してください。広告の数字をうのみにせず、落ち着いて判断しましょう。"
         "副業を始めるなら、まずは信頼できる情報源で調べることをおすすめします。")

# Contact details in full-width digits: NFKC first, then hojichar masks them.
PII = ("商店街の夏祭りでは、今年もボランティアの方を募集しています。受付や会場の案内、ごみの分別の手伝いなど、"
       "できることを一つだけでも引き受けていただけると助かります。参加を希望される方や、内容について知りたい方は、"
       "実行委員会の事務局(電話 ０３－１２３４－５６７８、メール matsuri.jimukyoku@example.jp)までご連絡ください。"
       "平日の昼間は担当者が不在のことがありますので、夕方以降にお電話いただくか、メールでお知らせください。")
PII_MASKED = normalize_text(PII).replace("03-1234-5678", "03-1234-XXXX").replace(
    "matsuri.jimukyoku@example.jp", "xxxx@yyy.jp")

# --- documents that each fail one filter -----------------------------------
SHORT = "今日はいい天気ですね。散歩に行きましょう。"
ENGLISH = ("The river that runs through our town has supported people for centuries. Boats once carried rice "
           "and charcoal down to the harbour, and warehouses lined both banks. Today children play in the "
           "shallows on summer weekends, and volunteers clean the banks every autumn. Learning the history of "
           "the river helps young people care about the place where they live.")
CHINESE = ("今天天气很好，我们一起去公园散步。公园里有很多人在跑步、打太极拳，还有小朋友在草地上放风筝。"
           "湖边的柳树已经发芽了，微风吹来，让人感到非常舒服。中午我们在附近的小饭馆吃了面条和饺子，"
           "味道很不错，价格也很便宜。下午回家以后，我把今天拍的照片整理了一下，发给了远方的朋友。"
           "希望下个周末也是晴天，这样我们还可以去郊外爬山，看看山上的风景。"
           "晚上我们还打算一起做饭，尝尝新学的家常菜。"
           "做完饭以后，大家一边聊天一边看电视，度过了愉快的一天。")
SPAM = "夏の大セールを開催しています。" + "今だけお得！" * 40
DUP_LINES = "\n".join([
    "毎朝のストレッチで体が軽くなり、通勤の疲れが残りにくくなりました。",
    "寝る前にスマートフォンを見ないようにすると、ぐっすり眠れるようになります。",
    "野菜から先に食べるだけで、食べすぎを防ぎやすくなるといわれています。",
    "週末に少し長めに歩くと、気分がすっきりして新しい週を迎えられます。",
] * 2)
RUN_ON = ("この鞄は軽くて丈夫で持ち運びにも便利なので毎日の通勤や通学はもちろん週末のお出かけや旅行にも使えて"
          "内側には小物を整理できるポケットがたくさん付いているので鍵や財布やスマートフォンをすぐに取り出せて"
          "外側は雨にも強い素材でできているので急な天気の変化にも安心でさらに肩ひもの長さも自由に変えられるので"
          "背の高い人にも低い人にもぴったり合わせることができてしかも色は全部で八種類から選べますし"
          "お手入れも簡単で汚れたら濡れた布でさっと拭くだけできれいになります")
MENU = "\n".join([
    "ホーム", "お知らせ", "よくあるご質問", "お問い合わせ", "ご利用ガイド", "サイトマップ", "アクセス",
    "採用情報", "ごあいさつ", "会社のあゆみ", "事業のご紹介", "お客さまの声", "ニュース一覧", "個人情報の取り扱い",
    "ご注文の流れ", "お支払いについて", "送料とお届け", "返品と交換", "ログイン", "新規会員登録", "カートを見る",
    "ポイントのご案内", "ギフトのご相談", "店舗のご案内", "営業日カレンダー", "メルマガ登録", "ブログ",
    "スタッフ紹介", "おすすめ商品", "季節のおすすめ", "ランキング", "新着アイテム", "再入荷のお知らせ",
    "セール情報", "クーポン", "レビューを書く", "ページの先頭へ", "前のページへもどる",
])

# hojichar's filters: a job advertisement (ads), a comment thread
# (bbs_comments), and a memoir using a word on hojichar's discrimination list (保母, a nursery
# teacher), which the defaults keep: that list is off (default_config.yaml says why).
ADS = ("駅前の新しいカフェで一緒に働く仲間を募集しています。求人情報の詳細は以下のとおりです。勤務地は本店と駅の反対側にある"
       "支店のどちらかを選べます。勤務期間は三か月以上を目安にしてください。未経験歓迎なので、接客が初めての方も安心して"
       "ご応募ください。応募資格は十八歳以上であることだけです。求める人物は、笑顔であいさつができる方です。研修制度が整って"
       "いるので、最初の二週間は先輩がていねいに教えます。営業時間は朝八時から夜九時までで、シフトは週二日から相談できます。"
       "ご応募の前に、よくある質問もご覧ください。通販の送料についてはこちらでは答えられません。勤務地や勤務期間について"
       "気になる点があれば、お気軽にお問い合わせください。未経験歓迎の職場で、応募資格を満たす方のご応募を店長一同お待ちして"
       "います。求人情報は毎週更新します。")
BBS = "\n".join([
    "家庭菜園の質問掲示板、過去ログのページです。",
    "1 投稿者:みどり 2024/05/01(水) 21:15",
    "ベランダでトマトを育てていますが、下の葉が黄色くなってきました。原因がわかる方はいますか。",
    "2 投稿者:たろう 2024/05/01(水) 22:03",
    "水のやりすぎかもしれません。土の表面が乾いてから与えるようにしてみてください。",
    "3 投稿者:みどり 2024/05/02(木) 07:40",
    "コメントありがとうございます。毎朝たっぷり水をあげていたので、少し控えてみます。",
    "4 投稿者:はなこ 2024/05/02(木) 12:18",
    "肥料が足りないときも下の葉から黄色くなるので、様子を見て追肥するとよいですよ。",
    "5 投稿者:たろう 2024/05/03(金) 18:55",
    "古い葉は取ってしまっても大丈夫です。風通しがよくなって、病気も防げます。",
    "6 投稿者:みどり 2024/05/04(土) 09:30",
    "みなさん、教えてくださってありがとうございました。実がなったらまた報告します。",
])
OLD_WORD = ("祖母は若いころ、町の小さな保育所で保母として働いていました。当時は今よりも子どもの数が多く、一つの部屋に三十人近くが"
            "集まることもあったそうです。お昼寝の時間になると、祖母は決まって古い子守歌を歌い、なかなか寝つけない子の背中を"
            "ゆっくりとさすっていたと聞きました。退職してからも、道で声をかけてくる元園児がいて、そのたびにうれしそうに"
            "昔の話をしてくれます。保育の仕事は体力がいるけれど、子どもが日ごとに成長していく姿を見られるのが何よりの"
            "楽しみだった、と祖母はよく言います。")

KEPT = [D1, D2, D3, LONG, D6, WORDS, OLD_WORD, PII, D4, D5]  # in input order


def _line(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _doc(text: str, doc_id: str) -> bytes:
    return _line({"id": doc_id, "text": text, "url": f"https://example.jp/{doc_id}"})


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Four input files: two JSONL, one JSONL.gz and one broken .gz."""
    raw = tmp_path / "raw"
    raw.mkdir()
    a = [
        _doc(D1, "a1"),
        _doc(D2, "a2"),
        _doc(D3, "a3"),
        _doc(LONG, "a4"),
        _doc(SHORT, "a5"),  # too_short
        _doc(ENGLISH, "a6"),  # low_japanese
        _doc(CHINESE, "a7"),  # low_hiragana
        _doc(SPAM, "a8"),  # repetitive_ngram
        _doc(DUP_LINES, "a9"),  # duplicate_lines
        _doc(RUN_ON, "a10"),  # sentence_length (too long)
        _doc(MENU, "a11"),  # sentence_length (too short)
        '{"text": "途中で切れた行'.encode("utf-8"),  # invalid_json
        _line({"title": "本文のない記録"}),  # missing_field
        _line(["配列の行"]),  # missing_field
        b'{"text": "\xff\xfe\xfa"}',  # invalid_utf8
        _line({"text": ""}),  # empty_document
        b"",  # blank line: not a record, not counted
        _doc(D6, "a18"),
        _doc(WORDS, "a19"),
        _doc(ADS, "a20"),  # ads
        _doc(BBS, "a21"),  # bbs_comments
        _doc(OLD_WORD, "a22"),  # kept: the discrimination list is off
        _doc(PII, "a23"),  # kept, masked
    ]
    (raw / "a.jsonl").write_bytes(b"\n".join(a) + b"\n")
    b = [
        _doc(D4, "b1"),
        _doc(NEAR1, "b2"),  # near_duplicate of a.jsonl:4
        _doc(D6_ASCII, "b3"),  # exact_duplicate of a.jsonl:18 after NFKC
        _line({"text": " \n\u3000 "}),  # empty_document
        _doc(D1, "b5"),  # exact_duplicate of a.jsonl:1
    ]
    (raw / "b.jsonl").write_bytes(b"\n".join(b) + b"\n")
    c = [
        _doc(D5, "c1"),
        _doc(NEAR2, "c2"),  # near_duplicate of a.jsonl:4
        # exact_duplicate of a.jsonl:3 once line endings and spaces are normalised
        _doc(D3.replace("\n", "  \r\n"), "c3"),
    ]
    (raw / "c.jsonl.gz").write_bytes(gzip.compress(b"\n".join(c) + b"\n"))
    (raw / "broken.jsonl.gz").write_bytes(b"this is not gzip\n")  # unreadable_file
    return raw


EXPECTED_BAD = {"invalid_json": 1, "missing_field": 2, "invalid_utf8": 1,
                "empty_document": 2, "unreadable_file": 1}
# The default config: no word list, so no word_list counter.
EXPECTED_REMOVED = {"too_short": 1, "low_japanese": 1, "low_hiragana": 1, "repetitive_ngram": 1,
                    "duplicate_lines": 1, "sentence_length": 2, "little_prose": 0, "ads": 1, "bbs_comments": 1,
                    "exact_duplicate": 3, "near_duplicate": 2}
EXPECTED_PII = {"documents_masked": 1, "phone_numbers": 1, "email_addresses": 1}


def run_tool(raw: Path, out: Path, *extra: str) -> tuple[int, dict]:
    code = cli.main([f"--input={raw}/*.jsonl*", f"--output_dir={out}", "--no_progress", *extra])
    report_path = out / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {}
    return code, report


def read_output(out: Path) -> list[dict]:
    records = []
    for shard in sorted(out.glob("shard-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records


def test_counts_every_reason(raw, tmp_path, capsys):
    out = tmp_path / "clean"
    code, report = run_tool(raw, out, "--num_workers=1")
    assert code == 0
    assert report["bad_input"] == EXPECTED_BAD
    assert report["removed"] == EXPECTED_REMOVED
    assert report["pii"] == EXPECTED_PII
    assert report["lines_read"] == 30
    assert report["documents_in"] == 24
    assert report["documents_out"] == len(KEPT) == 10
    assert report["documents_in"] == report["documents_out"] + sum(report["removed"].values())
    assert report["lsh"] == {"bands": 18, "rows_per_band": 7}
    assert report["libraries"]["hojichar"].startswith("0.18")
    printed = capsys.readouterr().out
    assert "near_duplicate" in printed and "documents out" in printed and "phone numbers" in printed

    records = read_output(out)
    assert [r["text"] for r in records] == [PII_MASKED if t is PII else normalize_text(t) for t in KEPT]
    # Other fields are carried over; NFKC folded the full-width digits.
    assert records[4]["id"] == "a18" and records[4]["url"] == "https://example.jp/a18"
    assert "8月20日" in records[4]["text"]


def test_examples_name_file_and_line(raw, tmp_path):
    _, report = run_tool(raw, tmp_path / "clean", "--num_workers=1")
    examples = report["examples"]
    near = examples["near_duplicate"]
    assert [e["source"] for e in near] == [f"{raw}/b.jsonl:2", f"{raw}/c.jsonl.gz:2"]
    assert all(e["duplicate_of"] == f"{raw}/a.jsonl:4" for e in near)
    assert examples["invalid_utf8"][0]["source"] == f"{raw}/a.jsonl:15"
    assert examples["unreadable_file"][0]["source"] == f"{raw}/broken.jsonl.gz:1"
    assert [e["source"] for e in examples["sentence_length"]] == [f"{raw}/a.jsonl:10", f"{raw}/a.jsonl:11"]
    assert examples["too_short"][0]["text"] == SHORT


def test_near_duplicates_removed_distinct_kept(raw, tmp_path):
    _, _ = run_tool(raw, tmp_path / "clean", "--num_workers=1")
    texts = {r["text"] for r in read_output(tmp_path / "clean")}
    assert normalize_text(LONG) in texts
    assert normalize_text(NEAR1) not in texts and normalize_text(NEAR2) not in texts
    assert {normalize_text(t) for t in (D1, D2, D3, D4, D5, D6)} <= texts


def test_output_is_identical_for_any_worker_count(raw, tmp_path):
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"clean{workers}"
        code, report = run_tool(raw, out, f"--num_workers={workers}", "--shard_size=4")
        assert code == 0 and report["removed"] == EXPECTED_REMOVED
        outputs[workers] = {p.name: p.read_bytes() for p in out.glob("shard-*")}
    assert sorted(outputs[1]) == ["shard-00000-of-00003.jsonl.gz", "shard-00001-of-00003.jsonl.gz",
                                  "shard-00002-of-00003.jsonl.gz"]
    assert outputs[1] == outputs[2]


def test_word_list_from_config(raw, tmp_path):
    (tmp_path / "words.txt").write_text("# 広告でよく見る語\nカジノ\n副業\n", encoding="utf-8")
    config = tmp_path / "strict.yaml"
    config.write_text("filters:\n  word_list_path: words.txt\n  max_word_list_hits: 2\n", encoding="utf-8")
    code, report = run_tool(raw, tmp_path / "clean", "--num_workers=1", f"--config={config}")
    assert code == 0
    assert report["removed"] == {**EXPECTED_REMOVED, "word_list": 1}
    assert list(report["removed"]).index("word_list") == list(report["removed"]).index("little_prose") + 1
    assert report["documents_out"] == len(KEPT) - 1
    assert report["examples"]["word_list"][0]["source"] == f"{raw}/a.jsonl:19"


def test_text_field_option(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_line({"body": D1}) + b"\n" + _line({"text": D2}) + b"\n")
    code = cli.main([f"--input={src}", f"--output_dir={tmp_path / 'out'}", "--text_field=body",
                     "--num_workers=1", "--no_progress"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["documents_out"] == 1 and report["bad_input"]["missing_field"] == 1


def test_existing_output_is_left_alone_without_overwrite(raw, tmp_path, capsys):
    out = tmp_path / "clean"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    code, _ = run_tool(raw, out, "--num_workers=1")
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, report = run_tool(raw, out, "--num_workers=1", "--overwrite")
    assert code == 0 and report["documents_out"] == len(KEPT)
    assert not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_output_dir_is_reused(raw, tmp_path):
    out = tmp_path / "clean"
    out.mkdir()
    code, report = run_tool(raw, out, "--num_workers=1")
    assert code == 0 and report["documents_out"] == len(KEPT)


def test_failure_leaves_no_partial_output(raw, tmp_path, monkeypatch):
    def fail(self, line):
        raise RuntimeError("disk full")

    monkeypatch.setattr(local_runner.ShardWriter, "write", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        run_tool(raw, tmp_path / "clean", "--num_workers=1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_pattern_matching_nothing_is_an_error(raw, tmp_path):
    missing = f"{raw}/nothing-*.jsonl"
    result = subprocess.run(
        [sys.executable, str(Path(REPO, "tools", "prepare_corpus.py")), f"--input={raw}/a.jsonl",
         f"--input={missing}", f"--output_dir={tmp_path / 'clean'}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert missing in result.stderr
    assert not (tmp_path / "clean").exists()


def test_beam_runner_removes_the_same_documents(raw, tmp_path):
    _, local = run_tool(raw, tmp_path / "local", "--num_workers=1")
    code, beam = run_tool(raw, tmp_path / "beam", "--runner=beam", "--shard_size=4")
    assert code == 0
    assert beam["removed"] == local["removed"] == EXPECTED_REMOVED
    assert beam["pii"] == local["pii"] == EXPECTED_PII
    assert beam["bad_input"] == local["bad_input"]
    for key in ("lines_read", "documents_in", "documents_out", "chars_in", "chars_out", "bytes_in"):
        assert beam[key] == local[key], key
    for reason in ("near_duplicate", "ads", "bbs_comments", "pii_masked"):
        assert beam["examples"][reason] == local["examples"][reason], reason
    beam_records = read_output(tmp_path / "beam")
    assert sorted(r["id"] for r in beam_records) == sorted(r["id"] for r in read_output(tmp_path / "local"))
    assert beam["shards"] == 3 and len(list((tmp_path / "beam").glob("shard-*-of-00003.jsonl.gz"))) == 3
