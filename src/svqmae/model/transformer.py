"""The Transformer both the encoder and the decoder are made of: pre-LayerNorm blocks with fused
attention and rotary position embeddings computed from each token's ORIGINAL position (the encoder
sees a sequence with gaps, so positions cannot be implied by the order).

Two layouts of a batch: padded, (B, L, D) with a key mask (True = real token); or packed, several
sequences end to end in one row (1, P, D), each token attending only to its own sequence
(:class:`Packed`: a variable-length flash-attention kernel on CUDA; elsewhere, or with attention
dropout, the attention call alone goes back to the padded layout).

Shapes: B batch, L sequence length, P packed length, H heads, hd head width, D width.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransformerConfig
from .masking import true_positions

try:  # variable-length flash attention (CUDA, torch >= 2.9)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None


def rotary(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position tables from ORIGINAL token positions. pos: (B, L) -> cos, sin: (B, L, 1, hd/2)."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angles = pos.float()[..., None] * freqs  # (B, L, hd/2)
    return angles.cos()[:, :, None], angles.sin()[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, L, H, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


@dataclass
class Packed:
    """Sequences laid end to end in one row of P tokens, taken from a padded (B, L) layout.

    ``rows`` (P,): each packed token's flat place in (B * L); the first ``total`` are the real tokens,
    row by row (the rest, a tail up to a shape bucket, repeat place 0 and form a sequence of their own);
    ``cu_seqlens`` (S + 1,) int32: where each non-empty sequence starts, then P; ``max_len``: the longest
    (a host int)."""

    rows: torch.Tensor
    total: int
    B: int
    L: int
    cu_seqlens: torch.Tensor
    max_len: int

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(1, P, ...) -> (B, L, ...), zeros at the padding."""
        flat = x.new_zeros(self.B * self.L, *x.shape[2:])
        return flat.index_copy(0, self.rows[: self.total], x[0, : self.total]).view(self.B, self.L, *x.shape[2:])

    def key_mask(self) -> torch.Tensor:
        """(B, 1, 1, L) bool, True at the real tokens of the padded layout."""
        flat = torch.zeros(self.B * self.L, dtype=torch.bool, device=self.rows.device)
        return flat.index_fill(0, self.rows[: self.total], True).view(self.B, 1, 1, self.L)


def pack_rows(valid: torch.Tensor, counts: list[int], bucket: int = 1) -> Packed:
    """Lay the real entries of a padded (B, L) layout end to end, without waiting for the device.

    valid: (B, L) bool; counts: its True entries per row, known on the host (left-aligned rows).
    P = sum(counts) rounded up to ``bucket`` (see :class:`Packed`)."""
    B, L = valid.shape
    total = sum(counts)
    P = max(-(-total // bucket) * bucket, 1)
    cu = list(accumulate((c for c in counts if c), initial=0)) + ([P] if P > total else [])
    cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(valid.device, non_blocking=True)
    return Packed(true_positions(valid, P), total, B, L, cu_seqlens, max([*counts, P - total, 1]))


@torch.compiler.disable  # compiled blocks break their graph here: attention is one kernel call anyway
def attend(q, k, v, keys: torch.Tensor | Packed, dropout_p: float) -> torch.Tensor:
    """q, k, v: (B, L, H, hd); keys: (B, 1, 1, L) bool key mask (True = key takes part), or
    :class:`Packed` (B = 1: each token attends to its own sequence). -> (B, L, H, hd).

    Packed: variable-length flash attention on CUDA (half precision, no attention dropout); elsewhere
    the sequences go back to their padded layout for this call (the same attention as unpacked, dropout
    included; only the rest of the block runs packed)."""
    global varlen_attn
    if isinstance(keys, Packed):
        p = keys
        if varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not dropout_p:
            cu = p.cu_seqlens
            try:
                return varlen_attn(q[0], k[0], v[0].contiguous(), cu, cu, p.max_len, p.max_len)[None]  # (1, P, H, hd)
            except RuntimeError as e:  # e.g. no flash kernel for this GPU: the padded call below does the same
                warnings.warn(f"variable-length attention unavailable ({str(e).splitlines()[0][:120]}); packed "
                              "attention goes through the padded layout from now on", stacklevel=2)
                varlen_attn = None
        a = attend(p.padded(q), p.padded(k), p.padded(v), p.key_mask(), dropout_p)  # (B, L, H, hd)
        return a.flatten(0, 1)[p.rows][None]  # (1, P, H, hd)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keys, dropout_p=dropout_p).transpose(1, 2)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block with fused attention."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, keys):
        """x: (B, L, D); cos, sin: (B, L, 1, hd/2); keys: (B, 1, 1, L) bool, True = key takes part, or Packed."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).unbind(2)  # (B, L, H, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = attend(q, k, v, keys, self.dropout if self.training else 0.0)  # (B, L, H, hd)
        x = x + self.drop(self.proj(a.reshape(B, L, D)))
        return x + self.drop(self.ffn(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None,
                packed: Packed | None = None) -> list[torch.Tensor]:
        """x: (B, L, D); pos: (B, L) original token positions; valid: (B, L) bool, False at padding;
        or, packed (B = 1), ``packed`` says which tokens attend to which (``valid`` unused).

        Returns every hidden state: [input, block 1, ..., block n (final-normed)], each (B, L, D).
        """
        cos, sin = rotary(pos, self.cfg.dim // self.cfg.heads, self.cfg.rope_base)
        keys = packed if packed is not None else valid[:, None, None, :]  # (B, 1, 1, L)
        hidden = [x]
        for block in self.blocks:
            x = block(x, cos, sin, keys)
            hidden.append(x)
        hidden[-1] = self.norm(x)
        return hidden

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block in place (parameter names unchanged); shapes are dynamic, so batches
        of new sizes reuse the compiled code (one graph serves every block of the same width)."""
        for block in self.blocks:
            block.compile(dynamic=True, **kwargs)


def init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
