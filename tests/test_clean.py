"""Normalisation and the quality filters of `cpmctl data build` (cpmctl/data/clean.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cpmctl.data.clean import (
    FilterSettings,
    chunk_reasons,
    codepoints,
    document_reason,
    normalise,
    read_blocklist,
    repeated_line_ratio,
    repeated_ngram_ratios,
)
from cpmctl.errors import CpmError

# --- normalise: width ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ＡＢＣ１２３", "ABC123"),
        ("Ｈｅｌｌｏ，ｗｏｒｌｄ！", "Hello，world！"),
        ("ａ＠ｂ．ｃｏｍ", "a@b.com"),
        ("１＋１＝２～", "1+1=2~"),
        ("［注］｛甲｝", "[注]{甲}"),
    ],
)
def test_full_width_ascii_becomes_half_width(raw, expected):
    assert normalise(raw) == expected


def test_chinese_punctuation_stays_full_width():
    text = "你好，世界！（测试）？是；否：对"
    assert normalise(text) == text
    # 。and 、 are not in the full-width ASCII block at all: unchanged.
    assert normalise("一、二。三") == "一、二。三"


def test_ideographic_space_becomes_space():
    assert normalise("中\u3000文") == "中 文"
    assert normalise("\u3000\u3000首行缩进") == "首行缩进"


# --- normalise: Unicode cleanup --------------------------------------------------------


def test_nfc_composition():
    assert normalise("e\u0301") == "\u00e9"
    assert normalise("cafe\u0301 au lait") == "caf\u00e9 au lait"
    # Composed and decomposed forms normalise to the same string.
    assert normalise("Ame\u0301lie") == normalise("Am\u00e9lie")


def test_control_characters_removed_newlines_kept():
    assert normalise("a\x00b\x07c\x1bd\x7fe\x85f\x9fg") == "abcdefg"
    assert normalise("第一行\n第二行") == "第一行\n第二行"
    assert normalise("a\x0bb\x0cc") == "abc"  # vertical tab and form feed are controls
    assert normalise("a\tb") == "a b"


def test_lone_surrogates_removed():
    assert normalise("ab\ud800cd\udfff") == "abcd"
    assert normalise("\udc80中文") == "中文"


def test_zero_width_and_bom_removed():
    assert normalise("a\u200bb\ufeffc\u2060d") == "abcd"
    assert normalise("\ufeff开头") == "开头"
    assert normalise("左\u200e右\u200f") == "左右"  # bidi marks


def test_line_and_paragraph_separators_become_newlines():
    assert normalise("a\u2028b") == "a\nb"
    assert normalise("a\u2029b") == "a\nb"


# --- normalise: whitespace -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  a   b \t c  ", "a b c"),
        ("a\u00a0\u00a0b", "a b"),
        ("a  \n  b", "a\nb"),
        ("a \n\n b", "a\n\nb"),
        ("a\n\n\n\nb", "a\n\nb"),
        ("a\n \n \n b", "a\n\nb"),
        ("\n\n  text  \n\n", "text"),
        ("\t中文\t", "中文"),
        ("", ""),
        ("   \n\n  ", ""),
    ],
)
def test_whitespace(raw, expected):
    assert normalise(raw) == expected


def test_crlf_line_end_is_one_newline():
    assert normalise("第一行\r\n第二行") == "第一行\n第二行"


def test_lone_carriage_return_is_a_newline():
    assert normalise("a\rb") == "a\nb"


# --- normalise: HTML -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<p>第一段</p><p>第二段</p>", "第一段\n\n第二段"),
        ("行一<br/>行二", "行一\n行二"),
        ("行一<br>行二<BR />行三", "行一\n行二\n行三"),
        ('<a href="http://example.com/x?a=1">链接</a>文字', "链接文字"),
        ("<b>粗体</b>和<span class='x'>内联</span>", "粗体和内联"),
        ("<div><h1>标题</h1><ul><li>一</li><li>二</li></ul></div>", "标题\n\n一\n\n二"),
        ("<!DOCTYPE html><html><body>正文</body></html>", "正文"),
        ("<script>var a = 1 < 2;</script>正文<!-- 注释 -->结束", "正文结束"),
        ("<style type='text/css'>p { color: red }</style>内容", "内容"),
        ("<SCRIPT>\nalert(1)\n</SCRIPT >内容", "内容"),
        ("<!--\n多行\n注释\n-->保留", "保留"),
        ("A &amp; B &lt;3 &#20013;&#x6587;", "A & B <3 中文"),
        ("价格&nbsp;&nbsp;100", "价格 100"),
    ],
)
def test_html_removed(raw, expected):
    assert normalise(raw) == expected


@pytest.mark.parametrize(
    "text",
    [
        "<三国演义>是一部小说",
        "文档结束<eod>下一篇",
        "AT&T 和 R&D",  # no entity: & stays
        "a < b 且 c > d",
        "《红楼梦》",
    ],
)
def test_non_html_left_alone(text):
    assert normalise(text) == text


# --- normalise: idempotence ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "ＡＢＣ，１２３！\u3000中文\u200b\ufeff",
        "e\u0301\u0301 \x00\x85 \ud800end",
        "<p>段落</p>\n\n\n<br/>  \t 行 <a href='#'>链接</a>",
        "a\u2028\u2029b\n \n \nc",
        "<三国演义><eod>AT&T &amp; 文字",
        "  \n混合　全角　空格  \r  ",
        "<script>x</script><!-- c -->文字&#20013;",
    ],
)
def test_normalise_is_idempotent(text):
    once = normalise(text)
    assert normalise(once) == once


@pytest.mark.parametrize(
    "text",
    [
        "&lt;p&gt;正文",
        "&lt;br/&gt;行",
        "&amp;lt;p&amp;gt;正文",  # double-escaped, as scraped pages often are
        "&amp;amp;lt;br/&amp;amp;gt;行",
        "&am<b>p;lt;p&gt;正文",  # removing a tag makes a new entity
    ],
)
def test_normalise_is_idempotent_on_escaped_markup(text):
    once = normalise(text)
    assert normalise(once) == once
    assert "<" not in once and "&" not in once


def test_normalise_is_idempotent_on_full_width_markup():
    once = normalise("＜ｐ＞正文")
    assert normalise(once) == once


# --- document_reason -------------------------------------------------------------------


def test_document_reason_lengths():
    settings = FilterSettings(min_chars=5, max_chars=12)
    assert document_reason("", settings) == "empty"
    assert document_reason("", FilterSettings(min_chars=0)) == "empty"
    assert document_reason("四个字儿", settings) == "too_short"
    assert document_reason("五个字儿了", settings) is None
    assert document_reason("十二个字的一个文档正好了", settings) is None
    assert document_reason("十三个字的一个文档超过了啊", settings) == "too_long"


def test_read_blocklist(tmp_path):
    path = tmp_path / "block.txt"
    path.write_text(
        "# a comment\n"
        "   # an indented comment\n"
        "\n"
        "赌博网站\n"
        "   \n"
        "ＢＡＤ\u3000Ｗord\n"
        "赌博网站\n",
        encoding="utf-8",
    )
    assert read_blocklist(str(path)) == ("BAD Word", "赌博网站")


def test_read_blocklist_errors(tmp_path):
    with pytest.raises(CpmError, match="blocklist file not found"):
        read_blocklist(str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(CpmError, match="not UTF-8"):
        read_blocklist(str(bad))


def test_document_reason_blocklist(tmp_path):
    path = tmp_path / "block.txt"
    path.write_text("# phrases\n\n赌博网站\nbad word\n", encoding="utf-8")
    settings = FilterSettings(min_chars=1, blocklist=read_blocklist(str(path)))
    assert document_reason("欢迎访问本赌博网站获取优惠", settings) == "blocklist"
    assert document_reason("this has a BAD WORD in it", settings) == "blocklist"  # any case
    assert document_reason("这是一个正常的文档内容", settings) is None
    assert document_reason("# phrases 出现在正文里", settings) is None  # comments aren't phrases


def test_document_reason_repeated_lines():
    settings = FilterSettings(min_chars=1)
    # lines of 5, 5, 5, 3 characters: the two repeats hold 10 of 18 characters.
    text = "第一行内容\n第一行内容\n第一行内容\n另一行"
    assert repeated_line_ratio(text) == pytest.approx(10 / 18)
    assert document_reason(text, settings) == "repeated_lines"
    # 3 of 10 characters repeat: exactly the limit 0.3, which is allowed.
    assert repeated_line_ratio("xyz\nxyz\nabcd") == pytest.approx(0.3)
    assert document_reason("xyz\nxyz\nabcd", settings) is None
    assert repeated_line_ratio("甲乙\n丙丁\n戊己") == 0.0
    # Blank lines (paragraph breaks) are not repeats.
    assert repeated_line_ratio("甲乙\n\n丙丁\n\n戊己") == 0.0
    assert document_reason("甲乙丙\n\n丁戊己\n\n庚辛壬", settings) is None


# --- chunk_reasons and the ratio helpers ---------------------------------------------


def test_chunk_reasons():
    settings = FilterSettings()
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "中文中文中文😀😀😀##",
        "今天天气很好我们去公园散步吧" * 5,
        "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    ]
    assert chunk_reasons(texts, settings) == ["low_cjk", "high_symbol", "repeated_ngrams", None]
    assert chunk_reasons([], settings) == []


def test_chunk_reasons_symbols_only():
    # Emoji and # alone are low_cjk first; with the CJK filter off they are high_symbol.
    assert chunk_reasons(["😀😀##🎉🎉##"], FilterSettings()) == ["low_cjk"]
    assert chunk_reasons(["😀😀##🎉🎉##"], FilterSettings(min_cjk_ratio=0.0)) == ["high_symbol"]


def test_chunk_reasons_whitespace_does_not_count():
    # 4 CJK + 6 ASCII letters out of 10 visible characters: 0.4 >= 0.3 although the spaces
    # make the string 20 characters long.
    text = "中 文 字 符 a b c d e f"
    assert chunk_reasons([text], FilterSettings()) == [None]
    assert chunk_reasons([text], FilterSettings(min_cjk_ratio=0.5)) == ["low_cjk"]


def _ratios(texts: list[str], n: int) -> list[float]:
    points, starts = codepoints(texts)
    return repeated_ngram_ratios(points, starts, n).tolist()


def test_codepoints():
    points, starts = codepoints(["ab", "", "中😀"])
    assert points.dtype == np.uint32
    assert points.tolist() == [ord("a"), ord("b"), ord("中"), 0x1F600]
    assert starts.tolist() == [0, 2, 2, 4]


@pytest.mark.parametrize(
    ("texts", "n", "expected"),
    [
        (["abcabc"], 3, [1.0]),
        (["abcdef"], 3, [0.0]),
        (["abcab"], 2, [0.8]),  # "ab" at 0 and 3 covers a, b, a, b of 5
        (["xabcyabcz"], 3, [6 / 9]),
        (["aaaa"], 2, [1.0]),
        (["ab"], 3, [0.0]),  # shorter than n
        # Repeats are counted within a document only:
        (["abcxyz", "abcuvw"], 3, [0.0, 0.0]),
        (["abcabc", "abcdef"], 3, [1.0, 0.0]),
        # Windows across the boundary ("xyab|abxy" holds "ab" twice, and "ba") don't count:
        (["xyab", "abxy"], 2, [0.0, 0.0]),
        (["", "abab"], 2, [0.0, 1.0]),
    ],
)
def test_repeated_ngram_ratios(texts, n, expected):
    assert _ratios(texts, n) == pytest.approx(expected)


def test_repeated_ngram_ratio_batch_equals_single():
    texts = ["今天天气很好今天天气很好", "北京上海广州深圳", "甲乙丙丁甲乙丙丁戊己", "一二三"]
    batch = _ratios(texts, 4)
    single = [_ratios([t], 4)[0] for t in texts]
    assert batch == pytest.approx(single)
    assert batch == pytest.approx([1.0, 0.0, 0.8, 0.0])


# --- FilterSettings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_cjk_ratio": 1.5}, "--min-cjk-ratio must be between 0 and 1"),
        ({"max_symbol_ratio": -0.1}, "--max-symbol-ratio must be between 0 and 1"),
        ({"max_repeated_line_ratio": 2.0}, "--max-repeated-line-ratio"),
        ({"max_repeated_ngram_ratio": -1.0}, "--max-repeated-ngram-ratio"),
        (
            {"min_chars": 10, "max_chars": 5},
            r"--max-chars \(5\) must be at least --min-chars \(10\)",
        ),
        ({"min_chars": -1}, "--max-chars"),
        ({"repeated_ngram": 1}, "--repeated-ngram must be at least 2"),
    ],
)
def test_filter_settings_validation(kwargs, message):
    with pytest.raises(CpmError, match=message):
        FilterSettings(**kwargs)


def test_filter_settings_bounds_allowed():
    settings = FilterSettings(min_cjk_ratio=0.0, max_symbol_ratio=1.0, min_chars=5, max_chars=5)
    assert (settings.min_chars, settings.max_chars) == (5, 5)
