"""Transcripts -> normalised text -> CTC units (characters or a sentencepiece model), and back.

Normalisation is the same for training targets, scoring references and hypotheses, and works for
any mix of languages without a language flag:

* Unicode NFKC: full-width forms become half-width (``ＡＢＣ１２３`` -> ``ABC123``, ``，`` -> ``,``);
* lower case (``units.lowercase``; English upper-case transcripts such as speechocean762's);
* punctuation and symbols become spaces, except an apostrophe inside a word (``don't``);
* CJK: no spaces next to a CJK character (Mandarin is written without word spaces; AISHELL's raw
  transcripts have word-segmentation spaces that the acoustic model cannot hear);
* runs of whitespace collapse to one space; leading/trailing spaces go.

Units, index 0 is always the CTC blank and index 1 ``<unk>``:

* ``char``: every character of the normalised training transcripts (Mandarin characters, English
  letters, space, apostrophe, digits...), sorted; characters rarer than ``min_count`` map to ``<unk>``.
  Stored as ``units.txt`` (one unit per line, JSON-escaped so that the space survives).
* ``bpe``: a sentencepiece model trained on the normalised training transcripts (``units.model``);
  unit i+1 is sentencepiece piece i (piece 0 is sentencepiece's own ``<unk>``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

BLANK, UNK = "<blank>", "<unk>"
CHARS_FILE, BPE_FILE = "units.txt", "units.model"


def is_cjk(ch: str) -> bool:
    """CJK ideographs (and extensions), kana and hangul: scripts written without word spaces."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FA1F
        or 0xF900 <= cp <= 0xFAFF or 0x3040 <= cp <= 0x30FF or 0xAC00 <= cp <= 0xD7AF
    )


_CJK = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]"
_SPACE_NEXT_TO_CJK = re.compile(rf"(?<={_CJK}) +| +(?={_CJK})")


def normalize(text: str, lowercase: bool = True) -> str:
    """Normalise a transcript (see the module docstring). ``normalize("") == ""``."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2019", "'").replace("`", "'")  # typographic apostrophes
    if lowercase:
        text = text.lower()
    out = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch == "'":
            inside = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            out.append("'" if inside else " ")
        elif cat[0] in "PSZC":  # punctuation, symbols, separators, control characters
            out.append(" ")
        else:
            out.append(ch)
    text = re.sub(r"\s+", " ", "".join(out)).strip()
    return _SPACE_NEXT_TO_CJK.sub("", text)


def words(text: str) -> list[str]:
    """Tokens for WER: whitespace-separated words, each CJK character a word of its own (so that
    Mandarin WER equals its CER, the usual convention)."""
    return re.sub(rf"({_CJK})", r" \1 ", text).split()


class Units:
    """A CTC output vocabulary: ``encode(text) -> ids`` (no blank), ``decode(ids) -> text``."""

    kind = "base"

    def __init__(self, labels: list[str], lowercase: bool = True):
        self.labels = labels  # index -> printable unit; [0] blank, [1] <unk>
        self.lowercase = lowercase

    def __len__(self) -> int:
        return len(self.labels)

    def normalize(self, text: str) -> str:
        return normalize(text, self.lowercase)

    def unseen(self, text: str) -> list[str]:
        """Characters of normalised ``text`` that the units cannot spell (they become ``<unk>``)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def decoder_labels(self) -> list[str]:
        """Labels for pyctcdecode (index-aligned with the model's outputs)."""
        raise NotImplementedError

    def save(self, folder: Path) -> str:
        raise NotImplementedError


class CharUnits(Units):
    kind = "char"

    def __init__(self, labels: list[str], lowercase: bool = True):
        super().__init__(labels, lowercase)
        self.index = {u: i for i, u in enumerate(labels)}

    @classmethod
    def build(cls, texts: Iterable[str], lowercase: bool = True, min_count: int = 1) -> CharUnits:
        counts = Counter(ch for t in texts for ch in normalize(t, lowercase))
        chars = sorted(ch for ch, n in counts.items() if n >= min_count)
        return cls([BLANK, UNK, *chars], lowercase)

    def unseen(self, text: str) -> list[str]:
        return [ch for ch in self.normalize(text) if ch not in self.index]

    def encode(self, text: str) -> list[int]:
        return [self.index.get(ch, 1) for ch in self.normalize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.labels[i] for i in ids if i > 1)

    def decoder_labels(self) -> list[str]:
        """pyctcdecode scores an LM at word boundaries. When the units hold CJK characters, every
        CJK character is presented as a word of its own (sentencepiece style ``▁X``; the space as a
        bare ``▁``), so that a character n-gram LM (an ARPA over space-separated characters, the
        usual for AISHELL) is applied per character; the decoded text is re-normalised after."""
        labels = ["", "⁇"] + self.labels[2:]
        if not any(is_cjk(u) for u in self.labels[2:]):
            return labels
        return ["", "▁⁇▁"] + ["▁" if u == " " else (f"▁{u}" if is_cjk(u) else u) for u in self.labels[2:]]

    def save(self, folder: Path) -> str:
        (folder / CHARS_FILE).write_text("".join(json.dumps(u, ensure_ascii=False) + "\n" for u in self.labels),
                                         encoding="utf-8")
        return CHARS_FILE

    @classmethod
    def load(cls, path: Path, lowercase: bool = True) -> CharUnits:
        try:
            labels = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable units file ({e.__class__.__name__})") from None
        if labels[:2] != [BLANK, UNK]:
            raise ValueError(f"{path}: not an svqmae units file (must start with {BLANK}, {UNK})")
        return cls(labels, lowercase)


class BPEUnits(Units):
    kind = "bpe"

    def __init__(self, model_proto: bytes, lowercase: bool = True):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        labels = [BLANK, UNK] + [self.sp.id_to_piece(i) for i in range(1, self.sp.get_piece_size())]
        super().__init__(labels, lowercase)
        self.chars = {ch for p in labels[2:] for ch in p.replace("▁", " ")}

    @classmethod
    def build(cls, texts: Iterable[str], lowercase: bool = True, vocab_size: int = 300) -> BPEUnits:
        import io

        import sentencepiece as spm

        lines = [t for t in (normalize(x, lowercase) for x in texts) if t]
        # sentencepiece needs room for every character (Mandarin: thousands) plus some merges
        vocab_size = max(vocab_size, len({ch for t in lines for ch in t if ch != " "}) + 8)
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="unigram",
            character_coverage=1.0, hard_vocab_limit=False, bos_id=-1, eos_id=-1, unk_id=0,
            split_by_unicode_script=True, minloglevel=2, num_threads=1,
        )
        return cls(buf.getvalue(), lowercase)

    def unseen(self, text: str) -> list[str]:
        return [ch for ch in self.normalize(text) if ch != " " and ch not in self.chars]

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(self.normalize(text))]  # sentencepiece <unk> (0) -> 1

    def decode(self, ids: Iterable[int]) -> str:
        return normalize(self.sp.decode([i - 1 for i in ids if i > 1]), self.lowercase)

    def decoder_labels(self) -> list[str]:
        return ["", "▁⁇▁"] + self.labels[2:]

    def save(self, folder: Path) -> str:
        (folder / BPE_FILE).write_bytes(self.proto)
        return BPE_FILE

    @classmethod
    def load(cls, path: Path, lowercase: bool = True) -> BPEUnits:
        try:
            return cls(path.read_bytes(), lowercase)
        except Exception as e:
            raise ValueError(f"{path}: unreadable sentencepiece model ({str(e)[:120]})") from None


def build_units(kind: str, texts: list[str], lowercase: bool = True, vocab_size: int = 300,
                min_count: int = 1) -> Units:
    if kind == "char":
        return CharUnits.build(texts, lowercase, min_count)
    if kind == "bpe":
        return BPEUnits.build(texts, lowercase, vocab_size)
    raise ValueError(f"units must be char or bpe, got {kind!r}")


def load_units(folder: Path, kind: str, lowercase: bool = True) -> Units:
    if kind == "char":
        return CharUnits.load(folder / CHARS_FILE, lowercase)
    if kind == "bpe":
        return BPEUnits.load(folder / BPE_FILE, lowercase)
    raise ValueError(f"{folder}: unknown units kind {kind!r}")
