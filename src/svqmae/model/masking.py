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
    """Exact-ratio span masking, vectorized over the batch.

    For each utterance of L tokens, exactly ``num_masked(L, ratio)`` = m tokens are masked, in
    n = ceil(m / span) spans of ``span`` tokens (the last one may be shorter; spans may touch). The
    L - m unmasked tokens are spread over the n + 1 gaps around the spans uniformly at random (stars
    and bars: the n bars take a uniformly random subset of the L - m + n slots), so every layout of
    these spans is equally likely.

    Args:
        lengths: (B,) number of real tokens per utterance (<= T).
        T: padded length.
        ratio: share of tokens to mask.
        span: span length in tokens.
        generator: the only source of randomness (on CPU).
    Returns:
        (B, T) bool, True = masked. Padding is never masked.
    """
    device = lengths.device
    L = lengths.cpu().long()
    B = L.shape[0]
    m = torch.tensor([num_masked(int(x), ratio) for x in L], dtype=torch.long)  # (B,)
    n = -(-m // span)  # (B,) spans
    slots = L - m + n  # (B,) stars + bars
    S = max(int(slots.max()), 1) if B else 1
    # a uniformly random n-subset of the slots: the n smallest of iid uniform keys
    keys = torch.rand(B, S, generator=generator).masked_fill(torch.arange(S) >= slots[:, None], 2.0)
    rank = keys.argsort(1).argsort(1)  # (B, S)
    is_bar = rank < n[:, None]  # (B, S)
    s = is_bar.long().cumsum(1) - 1  # index of each bar among its row's bars
    start = torch.arange(S) - s + s * span  # stars before bar s, plus the s full spans before it
    length = torch.where(s == n[:, None] - 1, m[:, None] - span * (n[:, None] - 1), torch.full_like(s, span))
    # +1 at each span start, -1 at its end, then a running sum: > 0 inside a span
    delta = torch.zeros(B, T + 1, dtype=torch.long)
    ones = is_bar.long()
    delta.scatter_add_(1, start.clamp(0, T) * is_bar, ones)
    delta.scatter_add_(1, (start + length).clamp(0, T) * is_bar, -ones)
    mask = delta.cumsum(1)[:, :T] > 0
    return mask.to(device)


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
