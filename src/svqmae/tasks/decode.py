"""CTC decoding: greedy (best path) and beam search with pyctcdecode, optionally fused with a KenLM
n-gram language model (``--lm model.arpa`` or a KenLM binary; needs ``pip install kenlm``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..data.text import Units


def greedy(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks (0). log_probs: (B, T, V)."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for b, n in enumerate(lengths.tolist()):
        path = torch.unique_consecutive(best[b, :n]).tolist()
        out.append([i for i in path if i != 0])
    return out


def kenlm_available() -> bool:
    try:
        import kenlm  # noqa: F401
    except ImportError:
        return False
    return True


class Decoder:
    """Turns (B, T, V) log-probabilities into text with ``units``: greedy when ``beam <= 1`` and no LM,
    else pyctcdecode beam search (``alpha``: LM weight, ``beta``: word insertion bonus)."""

    def __init__(self, units: Units, beam: int = 1, lm: str | Path | None = None,
                 alpha: float = 0.5, beta: float = 1.0):
        self.units, self.beam = units, max(1, beam)
        self.lm = str(lm) if lm else None
        self.beam_decoder = None
        if self.lm is not None:
            if not Path(self.lm).is_file():
                raise FileNotFoundError(f"{self.lm}: language model file not found")
            if not kenlm_available():
                raise ConfigError(f"{self.lm}: --lm needs the kenlm python module; install it with "
                                  "`pip install kenlm` (or https://github.com/kpu/kenlm/archive/master.zip)")
            if self.beam == 1:
                self.beam = 32
        if self.beam > 1:
            for name in ("pyctcdecode", "pyctcdecode.decoder", "pyctcdecode.alphabet", "pyctcdecode.language_model"):
                logging.getLogger(name).setLevel(logging.ERROR)  # quiet its kenlm/unigram notices
            from pyctcdecode import build_ctcdecoder

            try:
                self.beam_decoder = build_ctcdecoder(units.decoder_labels(), kenlm_model_path=self.lm,
                                                     alpha=alpha, beta=beta)
            except (OSError, RuntimeError, ValueError) as e:
                raise ConfigError(f"{self.lm or 'beam search'}: cannot build the decoder ({str(e)[:200]})") from None

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        if self.beam_decoder is None:
            return [self.units.decode(ids) for ids in greedy(log_probs, lengths)]
        lp = log_probs.float().cpu().numpy()
        out = []
        for b, n in enumerate(lengths.tolist()):
            text = self.beam_decoder.decode(np.ascontiguousarray(lp[b, :n]), beam_width=self.beam)
            out.append(self.units.normalize(text.replace("⁇", " ")))
        return out
