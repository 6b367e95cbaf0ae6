"""Text out of DocBook HTML and roff man pages, as tools/debian_docs_corpus.py reads them."""

from kinoe_jax.corpus.markup_text import html_sections, html_text, join_lines, roff_text

PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html xmlns="http://www.w3.org/1999/xhtml"><head><title>3.2. 鉛筆</title>
<script>var skip = 1;</script></head><body>
<div class="navheader"><table><tr><th>3.2. 鉛筆</th></tr><tr><td><a href="a.html">前へ</a></td>
<td><img src="prev.png" alt="戻る"></td></tr></table></div>
<div class="toc"><ul><li><a href="x.html">目次の項目</a></li></ul></div>
<h2 class="title"><a id="_pencil"/>3.2. 鉛筆</h2>
<p>鉛筆ツールは輪郭のくっきりした線を
描きます。 細い線で下絵を描くときに便利です。</p>
<pre class="screen">$ gimp --version
GNU Image Manipulation Program</pre>
<h3 class="title"><a id="_options"/>3.2.1. オプション</h3>
<p>Size sets the width of the
line.</p>
<div class="navfooter"><a href="b.html">次へ</a></div>
</body></html>"""


def test_html_keeps_what_a_reader_sees_and_splits_at_headings():
    sections = html_sections(PAGE)
    assert [anchor for anchor, _, _ in sections] == ["_pencil", "_options"]
    pencil = sections[0][2]
    # A line break between Japanese characters goes; the space a writer typed stays.
    assert "鉛筆ツールは輪郭のくっきりした線を描きます。 細い線で" in pencil
    assert "$ gimp --version\nGNU Image Manipulation Program" in pencil  # <pre> keeps its lines
    assert sections[1][2] == "3.2.1. オプション\nSize sets the width of the line."
    text = html_text(PAGE)
    for chrome in ("前へ", "次へ", "目次の項目", "var skip", "戻る"):
        assert chrome not in text


def test_join_lines_puts_a_space_only_beside_latin_text():
    assert join_lines(["これは", "テストです。"]) == "これはテストです。"
    assert join_lines(["オプション", "-v を付けると"]) == "オプション -v を付けると"
    assert join_lines(["the width of", "the line"]) == "the width of the line"


MAN = r""".\" A comment that is not shown.
.de XX
.B never shown
..
.TH SAMPLE 1 "2024" "example" "ユーザーコマンド"
.SH 名前
sample \- 例を表示する
.SH 説明
.B sample
は与えられた
\fIファイル\fR を読み、
内容を表示する。
.TP
\fB\-v\fR, \fB\-\-verbose\fR
詳しく表示する。
.nf
sample \-v a.txt
sample b.txt
.fi
.Sh 関連項目
.Xr cat 1
"""


def test_roff_gives_paragraphs_without_macros_or_escapes():
    text = roff_text(MAN)
    lines = text.split("\n")
    assert lines[:4] == ["名前", "sample - 例を表示する", "説明", "sample は与えられたファイル を読み、内容を表示する。"]
    assert "-v, --verbose 詳しく表示する。" in lines  # a tagged paragraph reads as one line
    assert "sample -v a.txt" in lines and "sample b.txt" in lines  # no-fill lines stay lines
    assert lines[-2:] == ["関連項目", "cat 1"]  # BSD mdoc macros print their arguments
    for hidden in ("comment", "never shown", "SAMPLE", "\\f", ".TP"):
        assert hidden not in text


def test_a_man_page_that_only_points_elsewhere_is_not_a_document():
    assert roff_text(".so man1/other.1\n") is None
