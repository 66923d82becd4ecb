"""Padding-aware span masking: a pure function of its inputs and an explicit ``torch.Generator``.

Mask polarity, used everywhere in svqmae: ``mask[b, t] == True`` means token t of utterance b is
MASKED (hidden from the encoder, a prediction target). Padding tokens are never masked, and are not
visible either: use ``lengths`` (or :func:`padding_mask`) to tell them apart.

Everything here runs on the device of its inputs without waiting for it (no host synchronisation):
the only host-side inputs are the generator (on the CPU) and, where an output's size depends on the
data, that size, which the caller knows from the lengths it holds on the host (:func:`mask_counts`).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True at padding."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


def num_masked(length: int, ratio: float) -> int:
    """Tokens masked in an utterance of ``length`` tokens: round(ratio * length), keeping >= 1 visible
    and >= 1 masked whenever length >= 2."""
    if length <= 1:
        return 0
    return min(max(int(round(ratio * length)), 1), length - 1)


def num_masked_tensor(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """:func:`num_masked` of each of ``lengths`` (B,), on their device (round half to even, as Python's round)."""
    L = lengths.long()
    m = torch.round(L.double() * ratio).long().clamp(min=1)
    return torch.minimum(m, L - 1).clamp(min=0)


def mask_counts(lengths: list[int], ratio: float) -> tuple[list[int], list[int]]:
    """Host side: (masked, visible) token counts of utterances of ``lengths`` tokens, as span_mask draws them."""
    masked = [num_masked(int(L), ratio) for L in lengths]
    return masked, [int(L) - m for L, m in zip(lengths, masked)]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 32-bit x in int64, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_keys(B: int, T: int, generator: torch.Generator, device) -> torch.Tensor:
    """(B, T) int64 keys, uniform on [0, 2**32): one seed drawn from ``generator`` (CPU), then a
    counter-based hash of (seed, b, t) computed on ``device``. Key (b, t) does not depend on T, so
    padding a batch (longer T) changes no mask, and CPU and GPU draw the same masks."""
    seed = int(torch.randint(0, 2**32, (1,), generator=generator))
    row = _hash32(_hash32(torch.arange(B, device=device)) ^ seed)  # (B,)
    return _hash32(row[:, None] + _mul32(torch.arange(T, device=device), 0x9E3779B9)[None, :])  # (B, T)


def span_mask(
    lengths: torch.Tensor, T: int, ratio: float, span: int, generator: torch.Generator
) -> torch.Tensor:
    """Exact-ratio span masking, vectorized over the batch, on the device of ``lengths``.

    For each utterance of L tokens, exactly ``num_masked(L, ratio)`` = m tokens are masked, in
    n = ceil(m / span) spans of ``span`` tokens (the last one may be shorter; spans may touch). The
    L - m unmasked tokens are spread over the n + 1 gaps around the spans uniformly at random (stars
    and bars: the n bars take a uniformly random subset of the L - m + n slots), so every layout of
    these spans is equally likely.

    Args:
        lengths: (B,) number of real tokens per utterance (<= T), on any device.
        T: padded length.
        ratio: share of tokens to mask.
        span: span length in tokens.
        generator: the only source of randomness (on the CPU; one number is drawn from it).
    Returns:
        (B, T) bool on ``lengths.device``, True = masked. Padding is never masked. Row b depends only on
        the generator, b and lengths[b]: not on T, nor on the device.
    """
    device = lengths.device
    L = lengths.long()
    B = L.shape[0]
    m = num_masked_tensor(L, ratio)  # (B,)
    n = (m + span - 1) // span  # (B,) spans
    slots = L - m + n  # (B,) stars + bars, <= L <= T
    t = torch.arange(T, device=device)
    # a uniformly random n-subset of the slots: the n smallest of iid uniform keys
    keys = random_keys(B, T, generator, device).masked_fill(t >= slots[:, None], 2**32)
    rank = keys.argsort(dim=1, stable=True).argsort(dim=1)  # (B, T)
    is_bar = rank < n[:, None]  # (B, T)
    s = is_bar.long().cumsum(1) - 1  # index of each bar among its row's bars
    start = t - s + s * span  # stars before bar s, plus the s full spans before it
    length = torch.where(s == n[:, None] - 1, m[:, None] - span * (n[:, None] - 1), torch.full_like(s, span))
    # +1 at each span start, -1 at its end, then a running sum: > 0 inside a span
    delta = torch.zeros(B, T + 1, dtype=torch.long, device=device)
    ones = is_bar.long()
    delta.scatter_add_(1, start.clamp(0, T) * is_bar, ones)
    delta.scatter_add_(1, (start + length).clamp(0, T) * is_bar, -ones)
    return delta.cumsum(1)[:, :T] > 0


def true_positions(x: torch.Tensor, n: int) -> torch.Tensor:
    """Flat (row-major) positions of the True entries of bool ``x``, the first ``n`` of them: (n,) long.
    Entries past the number of True values are 0. ``x[mask]`` without the host synchronisation that
    boolean indexing needs, given the count ``n`` (known on the host)."""
    flat = x.reshape(-1)
    rank = flat.long().cumsum(0) - 1  # index of each True entry among them
    target = torch.where(flat & (rank < n), rank, n)  # the rest land in a sink at n
    out = torch.zeros(n + 1, dtype=torch.long, device=x.device)
    out.scatter_(0, target, torch.arange(flat.numel(), device=x.device))
    return out[:n]


def visible_index(
    mask: torch.Tensor, lengths: torch.Tensor, V: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the visible (real, unmasked) tokens, packed to the left.

    Args:
        mask: (B, T) bool, True = masked.
        lengths: (B,) real tokens.
        V: the width of the result, at least the most visible tokens of any utterance (known on the
            host from :func:`mask_counts`); None: computed, which waits for the device.
    Returns:
        idx: (B, V) long, original positions of visible tokens (padded with 0 past ``n_visible``).
        n_visible: (B,) long.
    """
    B, T = mask.shape
    visible = ~mask & ~padding_mask(lengths, T)  # (B, T)
    n_visible = visible.sum(1)
    if V is None:
        V = int(n_visible.max()) if B else 0
    # stable sort puts visible positions first, in their original order
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)  # (B, T)
    if V > T:
        order = torch.nn.functional.pad(order, (0, V - T))
    idx = order[:, :V]
    idx = idx.masked_fill(padding_mask(n_visible, V), 0)
    return idx, n_visible
