"""Utterance mixing (WavLM's denoising pre-training): a pure function of its inputs and an explicit
``torch.Generator``, padding-aware.

Some utterances of a batch get a segment of another utterance of the same batch added on top: the
encoder hears the mixture, while the targets stay those of the clean primary utterance, so the model
learns to follow the primary speaker through an interfering one (Chen et al. 2022, WavLM).

Shapes: B batch, S samples.
"""

from __future__ import annotations

import torch


def mix_utterances(
    waves: torch.Tensor,
    lengths: torch.Tensor,
    prob: float,
    max_share: float,
    ratio_db: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Return a copy of ``waves`` (B, S) in which each utterance, with probability ``prob``, has a
    segment of another utterance of the batch added on top.

    For a chosen utterance b of L_b samples: a partner p != b (uniform), an overlap of
    floor(u * max_share * L_b) samples (u ~ U[0, 1), at most the partner's length) at a uniform
    start inside b, taken from a uniform start inside p, scaled so that the energy of b (whole
    utterance, per sample) over the energy of the added segment is r dB, r ~ U[-ratio_db, ratio_db]
    (WavLM: overlap under half the primary, r in [-5, 5]). Padding stays zero; nothing changes for
    B < 2 or ``prob`` = 0, and then nothing is drawn from ``generator``.

    Args:
        waves: (B, S) float, zero-padded.
        lengths: (B,) real samples per utterance.
        prob: share of utterances that get a partner, in [0, 1].
        max_share: largest overlap as a share of the primary's length, in (0, 1].
        ratio_db: half-width of the primary-to-added energy ratio's range, in dB.
        generator: CPU generator for every draw.
    """
    B, S = waves.shape
    if prob <= 0 or B < 2:
        return waves
    dev = waves.device
    draws = torch.rand(B, 5, generator=generator).to(dev)  # chosen, partner, overlap, start in b, start in p
    ratio = ((torch.rand(B, generator=generator) * 2 - 1) * ratio_db).to(dev)  # (B,) dB
    lengths = lengths.to(dev).long()  # every index below is computed where the waves are: no host sync
    chosen = draws[:, 0] < prob
    partner = (torch.arange(B, device=dev) + 1 + (draws[:, 1] * (B - 1)).long().clamp(max=B - 2)) % B  # never b
    overlap = (draws[:, 2] * max_share * lengths).long().clamp(max=lengths[partner]) * chosen  # (B,) samples
    start_b = (draws[:, 3] * (lengths - overlap + 1)).long().clamp(max=lengths - overlap)
    start_p = (draws[:, 4] * (lengths[partner] - overlap + 1)).long().clamp(max=lengths[partner] - overlap)

    x = waves.float()
    j = torch.arange(S, device=dev)[None, :]  # (1, S)
    inside = (j >= start_b[:, None]) & (j < (start_b + overlap)[:, None])  # (B, S)
    src = (start_p[:, None] + j - start_b[:, None]).clamp(0, S - 1)  # (B, S) sample of the partner
    added = torch.gather(x[partner], 1, src) * inside  # (B, S)
    e_b = (x**2).sum(1) / lengths.clamp_min(1)  # (B,) energy per sample of the primary
    e_a = (added**2).sum(1) / overlap.clamp_min(1)  # (B,) of the added segment
    gain = torch.sqrt(e_b / (e_a.clamp_min(1e-10) * 10 ** (ratio / 10)))  # (B,)
    gain = torch.where(e_a > 1e-10, gain, torch.zeros_like(gain))  # a silent segment adds nothing
    return (x + gain[:, None] * added).to(waves.dtype)
