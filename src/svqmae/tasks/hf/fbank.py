"""A self-contained Kaldi log-mel filterbank: lhotse's ``Wav2LogFilterBank``, as svqmae configures it,
in plain PyTorch.

svqmae's front end (:class:`svqmae.model.FilterbankFrontend`) computes its filterbank with lhotse. The
modeling code that ``svqmae export-hf --with-code`` writes into a model folder must run where neither
svqmae nor lhotse is installed, so the generated code imports this class in lhotse's place. It is a
drop-in replacement for the settings svqmae uses (Kaldi fbank, ``snip_edges=False``, no dither, no
energy, power spectrum, povey window, DC removal, pre-emphasis 0.97, FFT size rounded up to a power of
two, torchaudio-compatible mel banks from 20 Hz to Nyquist - 400 Hz):

* the same parameter names (``wav2win._window``, ``_fb``, ``_eps``), so the same weights load into it;
* the same operations in the same order on the same memory layouts, so that its output equals lhotse's
  bit for bit once lhotse's window and mel matrix are loaded into it with ``load_state_dict``
  (``tests/test_hf.py`` checks it), and to float32 rounding otherwise. The window and mel matrix it
  computes itself (used only when a model is built from a config rather than loaded) match lhotse's to
  float32 rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def povey_window(length: int) -> torch.Tensor:
    """Kaldi's "povey" window: a symmetric Hann window to the power 0.85."""
    return torch.hann_window(length, periodic=False).pow(0.85)


def mel_banks(num_bins: int, fft_length: int, sample_rate: float, low_freq: float = 20.0,
              high_freq: float = -400.0) -> torch.Tensor:
    """Triangular mel filters, Kaldi / torchaudio style, as a ``(fft_length // 2 + 1, num_bins)`` matrix
    (the Nyquist bin gets no weight). ``high_freq <= 0`` is an offset from the Nyquist frequency."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq) or num_bins <= 3:
        raise ValueError(f"mel_banks: bad settings (low {low_freq} Hz, high {high_freq} Hz, {num_bins} bins, "
                         f"Nyquist {nyquist} Hz)")

    def mel(hz):
        return 1127.0 * torch.log(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)

    lo, hi = mel(low_freq), mel(high_freq)
    delta = (hi - lo) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1.0) * delta, lo + (b + 2.0) * delta  # (num_bins, 1)
    m = mel(sample_rate / fft_length * torch.arange(fft_length // 2, dtype=torch.float64))[None, :]
    up, down = (m - left) / (center - left), (right - m) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (num_bins, fft_length // 2)
    # transposed, not copied: lhotse's matrix has this memory layout, and the matrix product's rounding
    # depends on it
    return nn.functional.pad(banks, (0, 1)).T.float()  # (fft_length // 2 + 1, num_bins)


class _Window(nn.Module):
    """Holds the analysis window under lhotse's parameter name (``wav2win._window``)."""

    def __init__(self, length: int):
        super().__init__()
        self._window = nn.Parameter(povey_window(length), requires_grad=False)


class KaldiLogFilterBank(nn.Module):
    """(B, S) waveform -> (B, N, num_filters) log-mel energies, N = (S + shift // 2) // shift frames.

    Frames are centred: the signal is extended at both ends by reflection (the edge sample repeated)."""

    def __init__(self, sampling_rate: int = 16000, frame_length: float = 0.025, frame_shift: float = 0.01,
                 num_filters: int = 80, low_freq: float = 20.0, high_freq: float = -400.0,
                 preemph_coeff: float = 0.97):
        super().__init__()
        self.length = int(math.floor(frame_length * sampling_rate))  # samples per frame
        self.shift = int(math.floor(frame_shift * sampling_rate))
        self.fft_length = 1 << (self.length - 1).bit_length()  # the next power of two
        self.preemph_coeff = preemph_coeff
        self.wav2win = _Window(self.length)
        self._fb = nn.Parameter(mel_banks(num_filters, self.fft_length, sampling_rate, low_freq, high_freq),
                                requires_grad=False)
        self._eps = nn.Parameter(torch.tensor(torch.finfo(torch.float).eps), requires_grad=False)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, N, length) overlapping frames (a strided view of the reflected signal)."""
        S, L, shift = x.shape[1], self.length, self.shift
        n = (S + shift // 2) // shift
        left = (L - shift) // 2
        right = (n - 1) * shift + L - S - left  # samples needed past the end (may be <= 0)
        parts = [x[:, :left].flip(1), x]
        if right > 0:
            parts.append(x[:, S - right:].flip(1))
        return torch.cat(parts, dim=1).unfold(1, L, shift)[:, :n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.frames(x)
        frames = frames - frames.mean(dim=2, keepdim=True)  # DC offset
        shifted = nn.functional.pad(frames, (1, 0), mode="replicate")[:, :, :-1]
        frames = (frames - self.preemph_coeff * shifted) * self.wav2win._window  # pre-emphasis, window
        pad = self.fft_length - self.length
        if pad:
            frames = nn.functional.pad(frames.unsqueeze(1), [0, pad], mode="constant", value=0.0).squeeze(1)
        power = torch.fft.rfft(frames, dim=-1).abs() ** 2  # (B, N, fft_length // 2 + 1)
        return torch.max(torch.matmul(power, self._fb), self._eps).log()
