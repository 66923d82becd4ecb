"""CTC decoding: greedy best path, pyctcdecode beam search, the optional KenLM language model."""

from __future__ import annotations

import pytest
import torch

from svqmae.config import ConfigError
from svqmae.data.text import build_units
from svqmae.tasks import decode
from svqmae.tasks.decode import Decoder, greedy


def peaked(ids: list[int], vocab: int, gap: int = 1) -> torch.Tensor:
    """(1, T, V) log-probabilities spelling ``ids`` with ``gap`` blank frames after each unit."""
    frames = []
    for i in ids:
        frames += [i] + [0] * gap
    lp = torch.full((1, len(frames), vocab), -8.0)
    lp[0, torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    return lp.log_softmax(-1)


def test_greedy_merges_repeats_and_drops_blanks():
    path = torch.tensor([[3, 3, 0, 3, 2, 2, 0, 0, 4, 5]])
    lp = torch.nn.functional.one_hot(path, 6).float().log()
    assert greedy(lp, torch.tensor([10])) == [[3, 3, 2, 4, 5]]
    assert greedy(lp, torch.tensor([4])) == [[3, 3]]  # only the real frames


@pytest.mark.parametrize("kind, texts, say", [
    ("char", ["hello world", "good day"], "hello good day"),
    ("char", ["你好世界", "今天天气好"], "今天你好"),
    ("bpe", ["hello world good day"] * 5 + ["你好世界"] * 3, "good world你好"),
])
def test_beam_search_agrees_with_greedy_on_confident_outputs(kind, texts, say):
    units = build_units(kind, texts, vocab_size=30)
    lp = peaked(units.encode(say), len(units))
    n = torch.tensor([lp.shape[1]])
    assert Decoder(units, beam=1)(lp, n) == [say]
    assert Decoder(units, beam=8)(lp, n) == [say]


def test_language_model_errors(tmp_path, monkeypatch):
    units = build_units("char", ["ab"])
    with pytest.raises(FileNotFoundError, match="missing.arpa"):
        Decoder(units, lm=tmp_path / "missing.arpa")
    arpa = tmp_path / "lm.arpa"
    arpa.write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0\tab\n\n\\end\\\n")
    monkeypatch.setattr(decode, "kenlm_available", lambda: False)
    with pytest.raises(ConfigError, match="pip install kenlm"):
        Decoder(units, lm=arpa)


ARPA = """\\data\\
ngram 1=5
ngram 2=4

\\1-grams:
-0.5\t<s>\t-0.3
-0.5\t</s>
-0.4\tcat\t-0.3
-3.0\tcap\t-0.3
-1.0\t<unk>

\\2-grams:
-0.1\t<s> cat
-0.1\tcat </s>
-2.0\t<s> cap
-2.0\tcap </s>

\\end\\
"""


def test_kenlm_fusion_prefers_the_likelier_word(tmp_path):
    pytest.importorskip("kenlm")
    units = build_units("char", ["cat cap"])
    lp = peaked(units.encode("ca"), len(units))
    # the last letter is ambiguous between t and p, slightly favouring p acoustically
    last = torch.full((1, 2, len(units)), -8.0)
    last[0, 0, units.encode("p")[0]] = -0.6
    last[0, 0, units.encode("t")[0]] = -0.8
    last[0, 1, 0] = 0.0
    lp = torch.cat([lp, last.log_softmax(-1)], 1)
    n = torch.tensor([lp.shape[1]])
    assert Decoder(units, beam=8)(lp, n) == ["cap"]
    (tmp_path / "lm.arpa").write_text(ARPA)
    assert Decoder(units, beam=8, lm=tmp_path / "lm.arpa", alpha=1.0, beta=0.0)(lp, n) == ["cat"]
