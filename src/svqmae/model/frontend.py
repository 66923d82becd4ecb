"""The front end: 16 kHz waveform -> normalized log-mel filterbank frames stacked into tokens.

Shapes: B batch, S samples, N frames, F mel bins, T tokens (= N // stack), C = F * stack.
"""

from __future__ import annotations

import torch
from lhotse.features.kaldi.layers import Wav2LogFilterBank
from torch import nn

from ..config import FeatureConfig
from .masking import padding_mask


class FilterbankFrontend(nn.Module):
    """16 kHz waveform -> utterance-normalized 80-dim log-mel frames, stacked into tokens."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        self.hop = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
        self.fbank = Wav2LogFilterBank(
            sampling_rate=cfg.sample_rate,
            frame_length=cfg.frame_length_ms / 1000,
            frame_shift=cfg.frame_shift_ms / 1000,
            num_filters=cfg.n_mels,
        )

    def num_tokens(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Samples -> tokens (frames are centred: N = round(S / hop); the last partial token is dropped)."""
        return torch.div(num_samples + self.hop // 2, self.hop, rounding_mode="floor") // self.cfg.stack

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waves: (B, S) float at 16 kHz; lengths: (B,) samples -> tokens (B, T, C), token lengths (B,)."""
        s = self.cfg.stack
        # continue each utterance into its padding by mirroring its end, as the filterbank does at the
        # edge of an unpadded signal: an utterance gets the same features alone or inside a batch
        S = waves.shape[1]
        j = torch.arange(S, device=waves.device)[None, :]  # (1, S)
        src = torch.where(j < lengths[:, None], j, (2 * lengths[:, None] - 1 - j).clamp(min=0))
        waves = torch.gather(waves.float(), 1, src)
        with torch.autocast(device_type=waves.device.type, enabled=False):
            feats = self.fbank(waves)  # (B, N, F)
        B, N, Fb = feats.shape
        T = N // s
        tok_len = self.num_tokens(lengths).clamp(max=T)  # (B,)
        feats = feats[:, : T * s]
        # per-utterance mean/variance normalization over the real frames only
        valid = ~padding_mask(tok_len * s, T * s)[..., None]  # (B, T*s, 1)
        count = valid.sum(1, keepdim=True).clamp_min(1)
        mean = (feats * valid).sum(1, keepdim=True) / count
        var = (((feats - mean) * valid) ** 2).sum(1, keepdim=True) / count
        feats = ((feats - mean) * torch.rsqrt(var + 1e-5)) * valid
        return feats.reshape(B, T, s * Fb), tok_len  # (B, T, C)
