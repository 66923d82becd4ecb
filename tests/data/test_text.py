"""Text normalisation and CTC unit vocabularies (characters and sentencepiece)."""

from __future__ import annotations

import pytest

from svqmae.data.text import BLANK, UNK, BPEUnits, CharUnits, build_units, load_units, normalize, words


@pytest.mark.parametrize("raw, expected", [
    ("Hello, World!  It's  OK.", "hello world it's ok"),
    ("WE CALL IT BEAR", "we call it bear"),
    ("\u2018quoted\u2019 don\u2019t 'tis", "quoted don't tis"),
    ("state-of-the-art: 3.5%", "state of the art 3 5"),
    ("你好，世界！ＡＢＣ１２３。", "你好世界abc123"),  # full-width punctuation and forms
    ("而 对 楼市 成交 抑制 作用", "而对楼市成交抑制作用"),  # AISHELL word-segmentation spaces
    ("我们 use Python 编程", "我们use python编程"),
    ("「引号」《书名》、顿号", "引号书名顿号"),
    ("  ", ""),
    ("", ""),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_normalize_keeps_case_when_asked():
    assert normalize("Hello WORLD", lowercase=False) == "Hello WORLD"


def test_words_splits_cjk_characters():
    assert words("我们use python编程") == ["我", "们", "use", "python", "编", "程"]
    assert words("don't stop") == ["don't", "stop"]


def test_char_units_round_trip_and_unseen(tmp_path):
    units = CharUnits.build(["Hello world", "你好，世界", "DON'T"])
    assert units.labels[:2] == [BLANK, UNK]
    assert " " in units.labels and "'" in units.labels and "好" in units.labels
    for text in ("hello world", "你好世界", "don't"):
        ids = units.encode(text)
        assert 0 not in ids and units.decode(ids) == text
    ids = units.encode("hex")  # x unseen
    assert ids[-1] == 1 and units.unseen("Hex!") == ["x"]
    units.save(tmp_path)
    again = load_units(tmp_path, "char")
    assert again.labels == units.labels and again.encode("hello") == units.encode("hello")


def test_char_units_min_count_maps_rare_characters_to_unk():
    units = CharUnits.build(["aaab", "aab"], min_count=3)
    assert units.labels == [BLANK, UNK, "a"]
    assert units.encode("ab") == [2, 1]


def test_bpe_units_round_trip(tmp_path):
    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 10
    units = build_units("bpe", texts, vocab_size=40)
    for text in ("the cat sat", "a dog and a mat"):
        ids = units.encode(text)
        assert min(ids) >= 1 and units.decode(ids) == text
    units.save(tmp_path)
    again = load_units(tmp_path, "bpe")
    assert isinstance(again, BPEUnits) and again.labels == units.labels
    assert again.encode("the mat") == units.encode("the mat")
    assert units.unseen("the zebra") == ["z", "b", "r"]


def test_bpe_vocabulary_grows_to_cover_every_mandarin_character():
    texts = ["其中有两个是内因的指标", "就是根据经济体自身情况决定房价上涨或者下跌"]
    units = build_units("bpe", texts, vocab_size=8)  # fewer than the distinct characters
    assert units.decode(units.encode(texts[1])) == texts[1]
    assert not units.unseen(texts[0])


def test_bad_units(tmp_path):
    with pytest.raises(ValueError, match="char or bpe"):
        build_units("words", ["a"])
    (tmp_path / "units.txt").write_text('"a"\n')
    with pytest.raises(ValueError, match="units.txt"):
        load_units(tmp_path, "char")
