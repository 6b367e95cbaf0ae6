"""The filters that replaced single-hit rules: prose, density of bulletin-board markers and of
listed words; and the labels the real-text benchmark measures them against."""

import pytest

from kinoe_jax.corpus.config import ConfigError, load_config
from kinoe_jax.corpus.filter_eval import evaluate
from kinoe_jax.corpus.filters import QualityFilter, normalize_text, prose_chars
from kinoe_jax.corpus.labels import DEBIAN_DOCS_LABELS, DROP_REASONS, check_ids, load_labels
from kinoe_jax.utils.errors import InputError

# A help page: option names and commands inline, sentences around them.
MANUAL = "\n".join([
    "名前",
    "tidy - 作業用ディレクトリの古いファイルを片付ける",
    "書式",
    "tidy [-n] [--days=N] [--keep-empty] DIR",
    "説明",
    "tidy は指定したディレクトリを調べ、しばらく使われていないファイルを削除します。",
    "--days=N を付けると、最後に変更されてから N 日より古いものだけが対象になります。",
    "-n を付けると何も消さず、消すはずだったファイルの名前だけを表示します。まず -n で試すと安心です。",
    "--keep-empty を付けると、空になったディレクトリも残します。既定では空のディレクトリも片付けます。",
    "オプション -h や --help を付けると使い方を短く表示し、-V や --version でバージョンを表示して終わります。",
])
# A package table: a heading, one sentence, then rows of names and numbers.
TABLE = "\n".join(["表2.1 圧縮ツールのリスト", "次のツールがあります。", "パッケージ", "サイズ", "説明"]
                  + [f"pkg{i}\nV:{i}, I:{i * 3}\n{i * 17}\nfoo-bar ユーティリティー" for i in range(12)])
# A comment thread: a marker every line.
REPLIES = ["ベランダのトマトの下の葉が黄色くなってきました。", "水のやりすぎかもしれませんね。", "肥料が足りないときもそうなりますよ。",
           "コメントありがとうございます。少し控えてみます。", "古い葉は取ってしまって大丈夫です。", "みなさん、ありがとうございました。"]
THREAD = "\n".join(f"{n} 投稿者:ゆき 2024/05/0{n}(水) 21:1{n}\n{reply}" for n, reply in enumerate(REPLIES, 1))
GREENGROCER = ("商店街の角にある八百屋は、朝七時に店を開ける。店先には近くの畑でとれた大根や白菜が並び、"
               "季節が変わるたびに顔ぶれも変わっていく。八百屋の主人は野菜の話になると止まらない人で、"
               "ほうれん草のゆで方から里芋の皮のむき方まで、聞けば何でも教えてくれる。")


def reason(text, overrides=None):
    cfg = load_config().filters
    if overrides:
        import dataclasses
        cfg = dataclasses.replace(cfg, **overrides)
    return QualityFilter(cfg).reason(normalize_text(text))


def test_prose_counts_sentences_not_table_rows():
    assert prose_chars(MANUAL, 10, 0.2) > 200
    assert prose_chars(TABLE, 10, 0.2) < 20
    assert reason(MANUAL) is None
    assert reason(TABLE) in ("little_prose", "low_hiragana", "sentence_length")


def test_bulletin_board_markers_are_a_density_and_hyphens_are_not_markers():
    assert reason(THREAD) == "bbs_comments"
    # Dozens of option hyphens used to count as markers; they no longer do.
    assert reason(MANUAL + "\n" + "\n".join(f"--option-{i} を付けると処理を{i}回くり返します。" for i in range(30))) is None


def test_the_discrimination_list_is_off_and_a_density_when_switched_on():
    assert reason(GREENGROCER) is None
    on = {"discrimination_content": True}
    # Two mentions in 130 characters are a dense use of the word: the list cannot tell a shop
    # from a slur, which is why it is off by default.
    assert reason(GREENGROCER, on) == "discrimination_content"
    long_text = GREENGROCER.replace("八百屋の主人", "店の主人") + "".join(
        f"{i}日目の朝も、通りには買い物客が行き交い、季節の野菜がよく売れていった。" for i in range(12))
    assert reason(long_text, on) is None  # one mention in a long text is under 2 per 1,000
    assert reason(long_text, {**on, "max_keyword_hits_per_1000": 0}) == "discrimination_content"


@pytest.mark.parametrize("key,value", [("min_japanese_fraction", 1.5), ("prose_line_min_hiragana", -0.1),
                                       ("max_duplicate_line_share", 2)])
def test_a_fraction_outside_zero_to_one_is_refused(tmp_path, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"filters:\n  {key}: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"filters\.{key} must be in \[0, 1\]"):
        load_config(path)


def test_the_committed_labels_are_well_formed_and_cover_every_package():
    labels = load_labels(DEBIAN_DOCS_LABELS)
    assert len(labels) >= 200
    packages = {doc_id.split(":")[0] for doc_id in labels}
    assert packages == {"manpages-ja", "gimp-help-ja", "debian-reference-ja"}
    assert {label.reason for label in labels.values() if not label.keep} <= set(DROP_REASONS)
    assert 0.3 < sum(label.keep for label in labels.values()) / len(labels) < 0.7


def test_labels_that_name_a_missing_document_or_a_bad_reason_are_refused(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("# note\ndoc:a\tkeep\ndoc:b\tdrop\ttoo_short\n", encoding="utf-8")
    labels = load_labels(path)
    check_ids(labels, ["doc:a", "doc:b", "doc:c"], path)
    with pytest.raises(InputError, match="'doc:b' is not in the corpus"):
        check_ids(labels, ["doc:a"], path)
    path.write_text("doc:a\tdrop\tugly\n", encoding="utf-8")
    with pytest.raises(InputError, match="drop reason 'ugly'"):
        load_labels(path)


def test_precision_and_recall_follow_the_labels():
    docs = [("m:1", "m", MANUAL), ("m:2", "m", TABLE), ("g:1", "g", THREAD), ("g:2", "g", GREENGROCER)]
    labels = load_labels_from({"m:1": "keep", "m:2": "drop", "g:1": "drop", "g:2": "keep"})
    ev = evaluate(docs, labels, load_config())
    assert (ev.chain_kept_keep, ev.labelled_keep, ev.chain_removed_drop, ev.labelled_drop) == (2, 2, 2, 2)
    bbs = next(s for s in ev.filters if s.reason == "bbs_comments")
    assert (bbs.removed_labelled, bbs.precision(), ev.recall(bbs)) == (1, 1.0, 0.5)
    assert bbs.removed_by_package == {"g": 1}


def load_labels_from(verdicts):
    from kinoe_jax.corpus.labels import Label
    return {doc_id: Label(v == "keep", "" if v == "keep" else "code_or_table") for doc_id, v in verdicts.items()}


def test_phone_numbers_in_brackets_and_toll_free_numbers_are_masked_too():
    from kinoe_jax.corpus.hojichar_filters import PiiMasker

    masker = PiiMasker()
    assert masker.mask("ご予約は (03)1234-5678 まで。") == ("ご予約は (03)1234-XXXX まで。", 1, 0)
    assert masker.mask("フリーダイヤル 0120-123-456 へどうぞ。") == ("フリーダイヤル 0120-123-XXX へどうぞ。", 1, 0)
    assert masker.mask("会員は1893人、創業は2024-01-20。") == ("会員は1893人、創業は2024-01-20。", 0, 0)
