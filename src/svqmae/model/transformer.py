"""The Transformer both the encoder and the decoder are made of: pre-LayerNorm blocks with fused
attention and rotary position embeddings computed from each token's ORIGINAL position (the encoder
sees a sequence with gaps, so positions cannot be implied by the order).

Shapes: B batch, L sequence length, H heads, hd head width, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransformerConfig


def rotary(pos: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position tables from ORIGINAL token positions. pos: (B, L) -> cos, sin: (B, 1, L, hd/2)."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angles = pos.float()[..., None] * freqs  # (B, L, hd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block with fused attention (scaled_dot_product_attention)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask):
        """x: (B, L, D); attn_mask: (B, 1, 1, L) bool, True = key takes part."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, L, hd)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, D)))
        return x + self.drop(self.ffn(self.norm2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, L, D); pos: (B, L) original token positions; valid: (B, L) bool, False at padding.

        Returns every hidden state: [input, block 1, ..., block n (final-normed)], each (B, L, D).
        """
        cos, sin = rotary(pos, self.cfg.dim // self.cfg.heads, self.cfg.rope_base)
        attn_mask = valid[:, None, None, :]  # (B, 1, 1, L)
        hidden = [x]
        for block in self.blocks:
            x = block(x, cos, sin, attn_mask)
            hidden.append(x)
        hidden[-1] = self.norm(x)
        return hidden


def init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
