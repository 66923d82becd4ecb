"""Padding-aware span masking: a pure function of its inputs and an explicit ``torch.Generator``.

Mask polarity, used everywhere in svqmae: ``mask[b, t] == True`` means token t of utterance b is
MASKED (hidden from the encoder, a prediction target). Padding tokens are never masked, and are not
visible either: use ``lengths`` (or :func:`padding_mask`) to tell them apart.
"""

from __future__ import annotations

import torch


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True at padding."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


def num_masked(length: int, ratio: float) -> int:
    """Tokens masked in an utterance of ``length`` tokens: round(ratio * length), keeping >= 1 visible
    and >= 1 masked whenever length >= 2."""
    if length <= 1:
        return 0
    return min(max(int(round(ratio * length)), 1), length - 1)


def span_mask(
    lengths: torch.Tensor, T: int, ratio: float, span: int, generator: torch.Generator
) -> torch.Tensor:
    """Exact-ratio span masking.

    For each utterance of L tokens, exactly ``num_masked(L, ratio)`` tokens are masked, in
    spans of ``span`` tokens (the last span may be shorter; spans may touch). The unmasked tokens are
    spread over the gaps between and around spans uniformly at random (stars and bars), so every
    layout with these spans is equally likely.

    Args:
        lengths: (B,) number of real tokens per utterance (<= T).
        T: padded length.
        ratio: share of tokens to mask.
        span: span length in tokens.
        generator: the only source of randomness (on CPU).
    Returns:
        (B, T) bool, True = masked. Padding is never masked.
    """
    B = lengths.shape[0]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, L in enumerate(lengths.tolist()):
        m = num_masked(int(L), ratio)
        if m == 0:
            continue
        n_spans = -(-m // span)  # ceil
        span_lens = [span] * (n_spans - 1) + [m - span * (n_spans - 1)]
        free = int(L) - m  # unmasked tokens to distribute over n_spans + 1 gaps
        # stars and bars: choose n_spans bar positions among free + n_spans slots
        bars = torch.randperm(free + n_spans, generator=generator)[:n_spans].sort().values.tolist()
        pos, prev = 0, -1
        for s, bar in enumerate(bars):
            pos += bar - prev - 1  # gap before this span
            mask[b, pos : pos + span_lens[s]] = True
            pos += span_lens[s]
            prev = bar
    return mask.to(lengths.device)


def visible_index(mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the visible (real, unmasked) tokens, packed to the left.

    Args:
        mask: (B, T) bool, True = masked.
        lengths: (B,) real tokens.
    Returns:
        idx: (B, V) long, original positions of visible tokens (padded with 0 past ``n_visible``).
        n_visible: (B,) long.
    """
    B, T = mask.shape
    visible = ~mask & ~padding_mask(lengths, T)  # (B, T)
    n_visible = visible.sum(1)
    V = int(n_visible.max()) if B else 0
    # stable sort puts visible positions first, in their original order
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)  # (B, T)
    idx = order[:, :V]
    idx = idx.masked_fill(padding_mask(n_visible, V), 0)
    return idx, n_visible
