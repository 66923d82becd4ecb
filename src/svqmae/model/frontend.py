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
    """16 kHz waveform -> normalized 80-dim log-mel frames, stacked into tokens.

    ``cfg.norm`` says how the mel bins are normalized: per utterance (its own mean and variance) or
    with fixed corpus statistics (``global_mean`` / ``global_std`` buffers, set once with
    :meth:`set_global_stats` before pre-training and saved with the model)."""

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
        if cfg.norm == "global":
            self.register_buffer("global_mean", torch.zeros(cfg.n_mels))  # (F,)
            self.register_buffer("global_std", torch.ones(cfg.n_mels))  # (F,)

    def set_global_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-bin corpus statistics of the log-mel frames, (F,) each (``norm: global`` only)."""
        self.global_mean.copy_(mean)
        self.global_std.copy_(std.clamp_min(1e-3))

    def log_mel(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalized log-mel frames (B, N, F) and the real frames per utterance (B,)."""
        # continue each utterance into its padding by mirroring its end, as the filterbank does at the
        # edge of an unpadded signal: an utterance gets the same features alone or inside a batch
        S = waves.shape[1]
        j = torch.arange(S, device=waves.device)[None, :]  # (1, S)
        src = torch.where(j < lengths[:, None], j, (2 * lengths[:, None] - 1 - j).clamp(min=0))
        waves = torch.gather(waves.float(), 1, src)
        with torch.autocast(device_type=waves.device.type, enabled=False):
            feats = self.fbank(waves)  # (B, N, F)
        n = torch.div(lengths + self.hop // 2, self.hop, rounding_mode="floor").clamp(max=feats.shape[1])
        return feats, n

    def num_tokens(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Samples -> tokens (frames are centred: N = round(S / hop); the last partial token is dropped)."""
        return torch.div(num_samples + self.hop // 2, self.hop, rounding_mode="floor") // self.cfg.stack

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, with_level: bool = False):
        """waves: (B, S) float at 16 kHz; lengths: (B,) samples -> tokens (B, T, C), token lengths (B,);
        with ``with_level``, also each utterance's level (B, 2F): the per-bin mean and log standard
        deviation of its real log-mel frames (what per-utterance normalization removes)."""
        s = self.cfg.stack
        feats, _ = self.log_mel(waves, lengths)  # (B, N, F)
        B, N, Fb = feats.shape
        T = N // s
        tok_len = self.num_tokens(lengths).clamp(max=T)  # (B,)
        feats = feats[:, : T * s]
        valid = ~padding_mask(tok_len * s, T * s)[..., None]  # (B, T*s, 1)
        count = valid.sum(1, keepdim=True).clamp_min(1)
        mean = (feats * valid).sum(1, keepdim=True) / count  # (B, 1, F) over the real frames only
        var = (((feats - mean) * valid) ** 2).sum(1, keepdim=True) / count
        if self.cfg.norm == "global":
            feats = (feats - self.global_mean) / self.global_std * valid
        else:  # per-utterance mean/variance normalization
            feats = ((feats - mean) * torch.rsqrt(var + 1e-5)) * valid
        tokens = feats.reshape(B, T, s * Fb)  # (B, T, C)
        if not with_level:
            return tokens, tok_len
        return tokens, tok_len, torch.cat([mean, 0.5 * torch.log(var + 1e-5)], -1)[:, 0]  # (B, 2F)
