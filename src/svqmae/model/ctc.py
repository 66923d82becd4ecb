"""The recognizer fine-tuned with CTC: front end -> backbone -> linear CTC head.

The ``svqmae`` backbone is the pre-trained encoder (its parameter names are those of
:class:`~svqmae.model.svqmae.SVQMAE` without the decoder, plus ``ctc_head``, so the weights of a
fine-tuned model also load as a plain encoder); ``lstm`` is the filterbank BiLSTM baseline.
SpecAugment-style masking of the filterbank tokens is applied between the front end and the backbone.

Shapes: B batch, S samples, T tokens, C = F * stack token features, D width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError, FinetuneConfig, SpecAugConfig
from .frontend import FilterbankFrontend
from .masking import padding_mask
from .svqmae import SVQMAE
from .transformer import init_weights

BACKBONES = ("svqmae", "lstm")


def spec_augment(tokens: torch.Tensor, tok_len: torch.Tensor, s: SpecAugConfig, stack: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Zero (= the utterance mean; features are normalised) time spans of tokens and bands of mel bins.
    tokens: (B, T, stack*F); masks are drawn inside each utterance's real length only."""
    B, T, Cdim = tokens.shape
    Fb = Cdim // stack
    keep_t = torch.ones(B, T, dtype=torch.bool)
    keep_f = torch.ones(B, Fb, dtype=torch.bool)
    for b, n in enumerate(tok_len.tolist()):
        for _ in range(int(round(s.time_mask_prob * n))):
            w = int(torch.randint(1, s.time_mask_width + 1, (1,), generator=generator))
            t0 = int(torch.randint(0, max(1, n - w + 1), (1,), generator=generator))
            keep_t[b, t0:t0 + w] = False
        for _ in range(s.freq_masks if s.freq_mask_width > 0 else 0):
            w = int(torch.randint(0, s.freq_mask_width + 1, (1,), generator=generator))
            f0 = int(torch.randint(0, Fb - w + 1, (1,), generator=generator))
            keep_f[b, f0:f0 + w] = False
    keep = keep_t[:, :, None, None] & keep_f[:, None, None, :]  # (B, T, 1, F)
    return (tokens.view(B, T, stack, Fb) * keep.to(tokens.device, tokens.dtype)).view(B, T, Cdim)


class CTCModel(nn.Module):
    """Front end -> backbone -> linear CTC head. For the ``svqmae`` backbone the parameter names are
    those of :class:`SVQMAE` without its decoder (plus ``ctc_head``), so the saved weights also load
    as a plain encoder with ``svqmae.load``."""

    HEAD = ("ctc_head.", "layer_weights")  # parameter-name prefixes of the head: what trains while the encoder is frozen

    def __init__(self, cfg: FinetuneConfig, vocab_size: int, backbone: str = "svqmae",
                 encoder: SVQMAE | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {backbone!r} (choose from {', '.join(BACKBONES)})")
        self.cfg, self.backbone, self.vocab_size = cfg, backbone, vocab_size
        f = cfg.model.features
        if backbone == "svqmae":
            enc = SVQMAE(cfg.model).drop_decoder()
            if encoder is not None:
                enc.load_state_dict(encoder.state_dict())
            self.frontend, self.quantizer, self.embed, self.encoder = enc.frontend, enc.quantizer, enc.embed, enc.encoder
            self.level_embed = enc.level_embed
            if cfg.model.features.level_state:  # unused by CTC; kept so that the encoder in a recognizer is whole
                self.register_buffer("level_proj", enc.level_proj)
            dim = cfg.model.encoder.dim
            if encoder is not None and cfg.ctc.reinit_top:
                self.reinit_top(cfg.ctc.reinit_top)
            if cfg.ctc.layer_sum:  # one weight per hidden state: the embedding and each block
                self.layer_weights = nn.Parameter(torch.zeros(cfg.model.encoder.layers + 1))
        else:
            if cfg.ctc.layer_sum:  # (ctc.reinit_top, like freezing, means nothing without a pre-trained encoder)
                raise ConfigError("ctc.layer_sum is for the svqmae backbone, not the filterbank BiLSTM baseline")
            dim = cfg.ctc.lstm_dim or cfg.model.encoder.dim
            self.frontend = FilterbankFrontend(f)
            self.lstm_in = nn.Sequential(nn.Linear(f.n_mels * f.stack, dim), nn.LayerNorm(dim))
            self.lstm = nn.LSTM(dim, dim // 2, num_layers=cfg.ctc.lstm_layers, batch_first=True,
                                bidirectional=True, dropout=cfg.model.encoder.dropout)
        self.head_drop = nn.Dropout(cfg.ctc.head_dropout)
        self.ctc_head = nn.Linear(dim, vocab_size * cfg.ctc.upsample)
        init_weights(self.ctc_head)

    def reinit_top(self, n: int) -> None:
        """Random weights for the top ``n`` blocks and the final norm (``ctc.reinit_top``)."""
        blocks = self.encoder.blocks
        if not 0 < n <= len(blocks):
            raise ConfigError(f"ctc.reinit_top={n}: the encoder has {len(blocks)} blocks")
        for block in blocks[len(blocks) - n:]:
            block.apply(init_weights)
        self.encoder.norm.apply(init_weights)

    @property
    def downsample_rate(self) -> int:
        return self.frontend.hop * self.cfg.model.features.stack // self.cfg.ctc.upsample

    def frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """CTC output frames for utterances of ``num_samples`` samples."""
        return self.frontend.num_tokens(num_samples) * self.cfg.ctc.upsample

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None,
                freeze: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """waves (B, S) 16 kHz, lengths (B,) samples -> CTC log-probabilities (B, T*k, V) float32 and (B,)
        frame counts. ``generator`` turns SpecAugment on; ``freeze`` runs the backbone without gradients."""
        tokens, tok_len, level = self.frontend(waves, lengths, with_level=True)  # (B, T, C), (B,), (B, 2F)
        if generator is not None:
            tokens = spec_augment(tokens, tok_len, self.cfg.specaug, self.cfg.model.features.stack, generator)
        B, T, _ = tokens.shape
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
            if self.backbone == "svqmae":
                pos = torch.arange(T, device=tokens.device).expand(B, T)
                valid = ~padding_mask(tok_len, T)
                hidden = self.encoder(SVQMAE.embed_tokens(self, tokens, level[:, None], valid), pos, valid)  # L+1 x (B, T, D)
                h = hidden[-1]
            else:
                packed = nn.utils.rnn.pack_padded_sequence(self.lstm_in(tokens), tok_len.clamp_min(1).cpu(),
                                                           batch_first=True, enforce_sorted=False)
                h = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=T)[0]
        if self.cfg.ctc.layer_sum:  # outside the freeze: the weights always train (svqmae backbone only)
            w = self.layer_weights.softmax(0)
            h = sum(w[i] * nn.functional.layer_norm(x, x.shape[-1:]) for i, x in enumerate(hidden))
        k = self.cfg.ctc.upsample
        logits = self.ctc_head(self.head_drop(h)).view(B, T * k, self.vocab_size)
        return logits.float().log_softmax(-1), tok_len * k
