"""SVQ-MAE: Speech Vector-Quantization Masked Auto-Encoder.

Read top to bottom: front end -> encoder (visible tokens only) -> decoupled decoder -> loss.

Shapes, everywhere in this file:
    B batch, S samples, N filterbank frames, F mel bins, T tokens (= N // stack), C = F * stack,
    V visible tokens (padded to the longest in the batch), M masked tokens in the whole batch,
    P visible tokens of the whole batch end to end (packed layout, ``self.pack``),
    D encoder width, E decoder width, G codebooks, K codebook size.

Mask polarity, stated once: ``mask[b, t] == True`` means token t is MASKED: the encoder never sees
it and the decoder predicts its code. Padding is neither masked nor visible (see ``lengths``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import io
from .frontend import FilterbankFrontend
from .masking import mask_counts, padding_mask, span_mask, true_positions, visible_index
from .quantizer import Quantizer, code_stats
from .transformer import Transformer, init_weights, pack_rows


class SVQMAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        f, q, enc, dec = cfg.features, cfg.quantizer, cfg.encoder, cfg.decoder
        C = f.n_mels * f.stack
        self.frontend = FilterbankFrontend(f)
        self.quantizer = Quantizer(q, C)
        self.embed = nn.Sequential(nn.Linear(C, enc.dim), nn.LayerNorm(enc.dim), nn.Dropout(enc.dropout))
        self.encoder = Transformer(enc)
        if cfg.variant == "svqmae":
            # the decoupled decoder: it alone reconstructs; dropped after pre-training
            self.enc_to_dec = nn.Linear(enc.dim, dec.dim)
            self.mask_embed = nn.Parameter(torch.randn(dec.dim) * 0.02)
            k = cfg.decoder_conv
            self.dec_conv = nn.Conv1d(dec.dim, dec.dim, k, padding=k // 2, groups=dec.dim) if k else None
            self.decoder = Transformer(dec)
            head_in = dec.dim
        else:
            # encoder-only ablation (BEST-RQ / HuBERT style): mask embedding inside the encoder
            self.mask_embed = nn.Parameter(torch.randn(enc.dim) * 0.02)
            head_in = enc.dim
        self.head = nn.Linear(head_in, q.num_codebooks * q.codebook_size)
        self.recon_head = nn.Linear(head_in, C) if cfg.recon_weight > 0 else None
        self.apply(init_weights)
        # how, not what, the pre-training forward computes (set by the engine, see svqmae.engine.speed):
        self.pack = False  # the encoder's visible tokens of the whole batch in one sequence (no padding)
        self.shape_bucket = 1  # token counts (T, V, P) padded up to a multiple of this: shapes repeat

    @property
    def downsample_rate(self) -> int:
        """Input samples per output token."""
        return self.frontend.hop * self.cfg.features.stack

    @property
    def has_decoder(self) -> bool:
        return hasattr(self, "head")

    def drop_decoder(self) -> SVQMAE:
        """Remove everything only pre-training needs; the encoder is what remains."""
        for name in ("enc_to_dec", "mask_embed", "dec_conv", "decoder", "head", "recon_head"):
            if hasattr(self, name):
                delattr(self, name)
        return self

    # ---- Hugging Face-style persistence: a folder of config.json + model.safetensors (see model.io)

    @classmethod
    def from_pretrained(cls, path, with_decoder: bool = False, device="cpu") -> SVQMAE:
        """Load a pre-trained model (a ``model/`` folder, a run DIR or a ``.ckpt``), in eval mode.

        By default the decoder is dropped and the encoder is returned; ``model.extract(waves, lengths)``
        gives every layer's hidden states."""
        saved = io.read_model(path)
        model = cls(saved.config.model)
        state = saved.state
        if not with_decoder:
            model.drop_decoder()
            own = model.state_dict().keys()
            state = {k: v for k, v in state.items() if k in own}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise io.CheckpointError(f"{saved.where}: weights do not match the config "
                                     f"(missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]})")
        model.config = saved.config  # the whole resolved config (svqmae.config.Config)
        model.card, model.figures = saved.card, saved.figures  # so that save_pretrained() round-trips them
        return model.to(device).eval()

    def save_pretrained(self, path, card: dict | None = None):
        """Write ``config.json``, ``model.safetensors`` and a model card ``README.md`` to ``path``."""
        from ..config import Config

        cfg = getattr(self, "config", None) or Config(model=self.cfg)
        card = card if card is not None else getattr(self, "card", None)
        return io.save_model(self, cfg, path, card, figures=getattr(self, "figures", ()))

    # ---- pre-training forward, in three parts

    def forward(
        self, waves: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """One pre-training step's forward. waves: (B, S) 16 kHz; lengths: (B,) samples, best on the CPU:
        the step's shapes (visible and masked token counts) are worked out from them on the host, so the
        step never waits for the device (lengths on the device cost one wait). ``generator`` (CPU) draws
        the masks. Returns the loss and metrics (0-dim tensors on the device); in training with the learned
        quantizer also ``quantizer_stats``, its EMA step's statistics (applied by the caller, once per
        optimizer step: ``model.quantizer.apply_update``)."""
        host_len = lengths.cpu()  # free when already there
        lengths = lengths.to(waves.device, non_blocking=True)
        tokens, tok_len = self.frontend(waves, lengths)  # (B, T, C), (B,)
        n_masked, n_vis = mask_counts(self.frontend.num_tokens(host_len).clamp(max=tokens.shape[1]).tolist(),
                                      self.cfg.mask.ratio)  # host lists, (B,) each
        tokens = F.pad(tokens, (0, 0, 0, self._bucket(tokens.shape[1]) - tokens.shape[1]))  # T: shapes repeat
        B, T, _ = tokens.shape
        codes = self.quantizer(tokens)  # (B, T, G) targets
        m = self.cfg.mask
        mask = span_mask(tok_len, T, m.ratio, m.span, generator)  # (B, T), on the device
        rows = true_positions(mask, sum(n_masked))  # (M,) the masked tokens, flat in (B * T)
        if self.cfg.variant == "svqmae":
            latent, slot = self.forward_encoder(tokens, mask, tok_len, n_vis)  # (B, V, D) or packed (1, P, D)
            h = self.forward_decoder(latent, slot, mask, tok_len, rows)  # (M, E)
        else:
            h = self.forward_encoder_only(tokens, mask, tok_len, rows)  # (M, D)
        out = self.forward_loss(h, codes, tokens, rows)
        valid = ~padding_mask(tok_len, T)
        if self.training and self.cfg.quantizer.kind == "learned":
            out["quantizer_stats"] = self.quantizer.update_stats(tokens, codes, valid, generator)
        out.update(code_stats(codes, valid, self.cfg.quantizer.codebook_size))
        out["visible_tokens"] = (valid & ~mask).sum().float()
        out["tokens"] = valid.sum().float()
        return out

    def forward_encoder(self, tokens, mask, tok_len, n_vis: list[int] | None = None):
        """Encoder on the visible tokens only, positioned by their original indices.

        tokens: (B, T, C); n_vis: visible tokens per utterance, known on the host (None: counted on the
        device, which waits for it). Returns latent (B, V, D), or with ``self.pack`` the visible tokens of
        the whole batch end to end, (1, P, D); and slot, of the same (rows, L) shape: where each latent
        row goes in the decoder's (B, T + 1) grid, flattened (padding -> a row's sink slot t = T)."""
        B, T, C = tokens.shape
        V = None if n_vis is None else self._bucket(max(n_vis, default=0))
        idx, n_visible = visible_index(mask, tok_len, V)  # (B, V), (B,)
        V = idx.shape[1]
        valid = ~padding_mask(n_visible, V)  # (B, V)
        b = torch.arange(B, device=idx.device)[:, None]  # (B, 1)
        src = idx + T * b  # (B, V) flat index into (B * T)
        slot = torch.where(valid, idx, T) + (T + 1) * b  # (B, V) flat index into (B * (T + 1))
        pos, packed = idx, None
        if self.pack and n_vis is not None:  # one row of P tokens: no padding but the bucket's tail
            packed = pack_rows(valid, n_vis, self.shape_bucket)
            rows = packed.rows  # (P,) places in (B * V)
            real = torch.arange(rows.shape[0], device=rows.device) < packed.total  # (P,)
            src, pos = src.flatten()[rows][None], idx.flatten()[rows][None]  # (1, P)
            slot = torch.where(real, slot.flatten()[rows], T)[None]  # (1, P); the tail -> row 0's sink
            valid = real[None]
        x = tokens.flatten(0, 1)[src]  # (B, V, C) or (1, P, C)
        x = self.embed(x * valid[..., None])  # padded slots carry nothing of any real token
        return self.encoder(x, pos, valid, packed)[-1], slot

    def forward_decoder(self, latent, slot, mask, tok_len, rows: torch.Tensor | None = None):
        """Put encoder outputs back in place, mask embedding elsewhere; decode; keep masked rows.
        latent: (B, V, D) or (1, P, D); slot: its places (see forward_encoder); rows: (M,) flat
        positions of the masked tokens (None: from ``mask``, which waits for the device) -> (M, E)."""
        B, T = mask.shape
        y = self.enc_to_dec(latent)  # (B, V, E) or (1, P, E)
        E = y.shape[-1]
        full = self.mask_embed.to(y.dtype).expand(B * (T + 1), E).clone()  # slot t = T of each row is a sink
        full = full.scatter(0, slot.reshape(-1, 1).expand(-1, E), y.reshape(-1, E)).view(B, T + 1, E)
        pos = torch.arange(T, device=y.device).expand(B, T)
        valid = ~padding_mask(tok_len, T)  # (B, T)
        x = full[:, :T]
        if self.dec_conv is not None:  # local context: spreads visible content onto neighbouring masked slots
            x = x * valid[..., None]
            x = x + F.gelu(self.dec_conv(x.transpose(1, 2)).transpose(1, 2))
        x = self.decoder(x, pos, valid)[-1]  # (B, T, E)
        return x.flatten(0, 1)[self._rows(mask, rows)]  # (M, E)

    def forward_encoder_only(self, tokens, mask, tok_len, rows: torch.Tensor | None = None):
        """Ablation: the encoder sees all tokens, masked ones replaced by the mask embedding. -> (M, D)"""
        B, T, _ = tokens.shape
        x = self.embed(tokens)  # (B, T, D)
        x = torch.where(mask[..., None], self.mask_embed.to(x.dtype), x)
        pos = torch.arange(T, device=x.device).expand(B, T)
        return self.encoder(x, pos, ~padding_mask(tok_len, T))[-1].flatten(0, 1)[self._rows(mask, rows)]

    def forward_loss(self, h, codes, tokens, rows):
        """Cross-entropy on the codes of the masked tokens (+ optional filterbank reconstruction).
        h: (M, E); codes: (B, T, G); tokens: (B, T, C); rows: (M,) the masked tokens, flat in (B * T)."""
        G, K = self.cfg.quantizer.num_codebooks, self.cfg.quantizer.codebook_size
        logits = self.head(h).float().view(-1, G, K)  # (M, G, K)
        target = codes.flatten(0, 1)[rows]  # (M, G)
        ce = F.cross_entropy(logits.reshape(-1, K), target.reshape(-1))
        out = {"ce": ce, "masked_acc": (logits.argmax(-1) == target).float().mean()}
        loss = ce
        if self.recon_head is not None:
            out["recon"] = F.mse_loss(self.recon_head(h).float(), tokens.flatten(0, 1)[rows].float())
            loss = loss + self.cfg.recon_weight * out["recon"]
        out["loss"] = loss
        return out

    def _bucket(self, n: int) -> int:
        """n rounded up to a multiple of ``shape_bucket``."""
        return -(-n // self.shape_bucket) * self.shape_bucket

    @staticmethod
    def _rows(mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return true_positions(mask, int(mask.sum())) if rows is None else rows

    # ---- feature extraction: no masking, every token, every layer

    def extract(
        self, waves: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """waves: (B, S) float at 16 kHz; lengths: (B,) samples (default: all S).

        Returns (hidden_states, token_lengths): the input embedding and one state per encoder layer,
        each (B, T, D), and (B,) real tokens per utterance."""
        if lengths is None:
            lengths = torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long, device=waves.device)
        tokens, tok_len = self.frontend(waves, lengths)  # (B, T, C)
        B, T, _ = tokens.shape
        pos = torch.arange(T, device=waves.device).expand(B, T)
        return self.encoder(self.embed(tokens), pos, ~padding_mask(tok_len, T)), tok_len
