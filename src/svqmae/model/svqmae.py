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
from .mixing import mix_utterances
from .quantizer import Quantizer, code_stats
from .transformer import Transformer, init_weights, pack_rows


def level_projection(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A fixed random map (n, dim) with orthonormal rows (n <= dim: the level keeps all its information)
    or columns (n > dim), from a constant seed; saved with the weights, so it never changes for a model."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(n, dim), min(n, dim), generator=g))  # orthonormal columns
    return (q.T if dim >= n else q).contiguous()


class SVQMAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        f, q, enc, dec = cfg.features, cfg.quantizer, cfg.encoder, cfg.decoder
        C = f.n_mels * f.stack
        self.frontend = FilterbankFrontend(f)
        self.quantizer = Quantizer(q, C)
        self.embed = nn.Sequential(nn.Linear(C, enc.dim), nn.LayerNorm(enc.dim), nn.Dropout(enc.dropout))
        # model.features.level: the utterance's level (2F), added to every token after the LayerNorm
        self.level_embed = nn.Linear(2 * f.n_mels, enc.dim) if f.level else None
        if f.level_state:  # model.features.level_state: the level handed out beside the encoder (extract)
            self.register_buffer("level_proj", level_projection(2 * f.n_mels, enc.dim))  # (2F, D), never trained
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
        if self.level_embed is not None:  # the level is ~5 in size (log-mel means near -7): start it small
            nn.init.normal_(self.level_embed.weight, std=0.005)  # beside the tokens' unit-scale content
        # how, not what, the pre-training forward computes (set by the engine, see svqmae.engine.speed):
        self.pack = False  # the encoder's visible tokens of the whole batch in one sequence (no padding)
        self.shape_bucket = 1  # token counts (T, V, P) padded up to a multiple of this: shapes repeat

    @property
    def downsample_rate(self) -> int:
        """Input samples per output token."""
        return self.frontend.hop * self.cfg.features.stack

    @property
    def num_states(self) -> int:
        """Hidden states ``extract()`` returns: [the level (model.features.level_state),] the input
        embedding, one per encoder block."""
        return int(self.cfg.features.level_state) + 1 + self.cfg.encoder.layers

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
        the mixing (``model.mix``, training only) and the masks (``model.mask.count`` per utterance: the
        front end and the quantizer run once, the encoder and decoder on every masked copy). Returns the
        loss and metrics (0-dim tensors on the device; ``tokens`` and ``visible_tokens`` count the masked
        copies); in training with the learned quantizer also ``quantizer_stats``, its EMA step's
        statistics (applied by the caller, once per optimizer step: ``model.quantizer.apply_update``)."""
        host_len = lengths.cpu()  # free when already there
        lengths = lengths.to(waves.device, non_blocking=True)
        # level: a statistic of the whole utterance, masked tokens included, as the per-utterance
        # normalization of the tokens is: 2F numbers, not the masked tokens' content
        tokens, tok_len, level = self.frontend(waves, lengths, with_level=True)  # (B, T, C), (B,), (B, 2F)
        n_tok = self.frontend.num_tokens(host_len).clamp(max=tokens.shape[1]).tolist()  # host list, (B,)
        T = self._bucket(tokens.shape[1])  # padded up: shapes repeat
        tokens = F.pad(tokens, (0, 0, 0, T - tokens.shape[1]))  # (B, T, C)
        codes = self.quantizer(tokens)  # (B, T, G) targets
        valid = ~padding_mask(tok_len, T)  # (B, T)
        out = {}
        if self.training and self.cfg.quantizer.kind == "learned":
            out["quantizer_stats"] = self.quantizer.update_stats(tokens, codes, valid, generator)
        out.update(code_stats(codes, valid, self.cfg.quantizer.codebook_size))
        clean = tokens  # the reconstruction target, if any
        mix = self.cfg.mix
        if self.training and mix.prob > 0:  # WavLM's denoising: the encoder hears a mixture, the targets stay clean
            noisy = mix_utterances(waves, lengths, mix.prob, mix.max_share, mix.ratio_db, generator)  # (B, S)
            tokens, _, level = self.frontend(noisy, lengths, with_level=True)
            tokens = F.pad(tokens, (0, 0, 0, T - tokens.shape[1]))  # (B, T, C)
        m = self.cfg.mask
        if m.count > 1:  # the same utterances under m.count masks (data2vec 2.0's multi-mask): B -> count * B
            tokens, codes, tok_len = tokens.repeat(m.count, 1, 1), codes.repeat(m.count, 1, 1), tok_len.repeat(m.count)
            clean, level, n_tok = clean.repeat(m.count, 1, 1), level.repeat(m.count, 1), n_tok * m.count
        n_masked, n_vis = mask_counts(n_tok, m.ratio)  # host lists, (B,) each
        mask = span_mask(tok_len, T, m.ratio, m.span, generator)  # (B, T), on the device
        rows = true_positions(mask, sum(n_masked))  # (M,) the masked tokens, flat in (B * T)
        if self.cfg.variant == "svqmae":
            latent, slot = self.forward_encoder(tokens, mask, tok_len, level, n_vis)  # (B, V, D) or packed (1, P, D)
            h = self.forward_decoder(latent, slot, mask, tok_len, rows)  # (M, E)
        else:
            h = self.forward_encoder_only(tokens, mask, tok_len, level, rows)  # (M, D)
        out.update(self.forward_loss(h, codes, clean, rows))
        valid = ~padding_mask(tok_len, T)
        out["visible_tokens"] = (valid & ~mask).sum().float()
        out["tokens"] = valid.sum().float()
        return out

    def embed_tokens(self, tokens, level, valid):
        """tokens: (R, L, C) -> embeddings (R, L, D), rows of utterances (R = B, L = T or V) or the packed
        row (R = 1, L = P); with ``model.features.level``, the utterance's level (R, 1 or L, 2F) is added to
        every real token. Padded slots carry nothing of any real token."""
        x = self.embed[1](self.embed[0](tokens * valid[..., None]))  # (R, L, D), LayerNorm-ed
        if getattr(self, "level_embed", None) is not None:  # after the LayerNorm: the level stays linear
            if level is None:
                raise ValueError("this model (model.features.level) needs each utterance's level: "
                                 "frontend(waves, lengths, with_level=True)")
            x = x + self.level_embed(level) * valid[..., None]
        return self.embed[2](x)

    def forward_encoder(self, tokens, mask, tok_len, level=None, n_vis: list[int] | None = None):
        """Encoder on the visible tokens only, positioned by their original indices.

        tokens: (B, T, C); level: (B, 2F) or None (see :meth:`embed_tokens`); n_vis: visible tokens per
        utterance, known on the host (None: counted on the device, which waits for it). Returns latent (B, V, D), or with ``self.pack`` the visible tokens of
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
        lev = None if level is None else level[:, None]  # (B, 1, 2F)
        if self.pack and n_vis is not None:  # one row of P tokens: no padding but the bucket's tail
            packed = pack_rows(valid, n_vis, self.shape_bucket)
            rows = packed.rows  # (P,) places in (B * V)
            real = torch.arange(rows.shape[0], device=rows.device) < packed.total  # (P,)
            src, pos = src.flatten()[rows][None], idx.flatten()[rows][None]  # (1, P)
            slot = torch.where(real, slot.flatten()[rows], T)[None]  # (1, P); the tail -> row 0's sink
            valid = real[None]
            lev = None if level is None else level[src // T]  # (1, P, 2F): each token's utterance's
        x = tokens.flatten(0, 1)[src]  # (B, V, C) or (1, P, C)
        x = self.embed_tokens(x, lev, valid)  # (B, V, D) or (1, P, D)
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

    def forward_encoder_only(self, tokens, mask, tok_len, level=None, rows: torch.Tensor | None = None):
        """Ablation: the encoder sees all tokens, masked ones replaced by the mask embedding. -> (M, D)"""
        B, T, _ = tokens.shape
        valid = ~padding_mask(tok_len, T)  # (B, T)
        x = self.embed_tokens(tokens, None if level is None else level[:, None], valid)  # (B, T, D)
        x = torch.where(mask[..., None], self.mask_embed.to(x.dtype), x)
        pos = torch.arange(T, device=x.device).expand(B, T)
        return self.encoder(x, pos, valid)[-1].flatten(0, 1)[self._rows(mask, rows)]

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
        self, waves: torch.Tensor, lengths: torch.Tensor | None = None, level_state: bool | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """waves: (B, S) float at 16 kHz; lengths: (B,) samples (default: all S).

        Returns (hidden_states, token_lengths): the input embedding and one state per encoder layer,
        each (B, T, D), and (B,) real tokens per utterance. With ``level_state`` (default:
        ``model.features.level_state``) the list begins with one more state, the utterance's level
        (:meth:`level_to_state`): ``num_states`` in all; the last is always the top block's."""
        if lengths is None:
            lengths = torch.full((waves.shape[0],), waves.shape[1], dtype=torch.long, device=waves.device)
        tokens, tok_len, level = self.frontend(waves, lengths, with_level=True)  # (B, T, C), (B,), (B, 2F)
        B, T, _ = tokens.shape
        pos = torch.arange(T, device=waves.device).expand(B, T)
        valid = ~padding_mask(tok_len, T)
        hidden = self.encoder(SVQMAE.embed_tokens(self, tokens, level[:, None], valid), pos, valid)  # L+1 x (B, T, D)
        if self.cfg.features.level_state if level_state is None else level_state:
            if not hasattr(self, "level_proj"):
                raise ValueError("this model has no level state (saved with model.features.level_state off)")
            hidden = [SVQMAE.level_to_state(self, level, valid).to(hidden[0].dtype), *hidden]
        return hidden, tok_len

    def level_to_state(self, level: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The utterance's level as a hidden state: level (B, 2F) (per-bin mean and log standard deviation,
        what per-utterance normalization took out of the tokens), valid (B, T) -> (B, T, D): the level
        through the fixed orthonormal map ``level_proj`` (2F, D), the same at every real token, zero at
        padding. A map rather than the raw values: a probe standardizes each dimension, and a mel bin that
        is empty in a whole corpus (8 kHz audio above 4 kHz) would otherwise be amplified noise."""
        x = level @ self.level_proj.to(level.dtype)  # (B, D)
        return x[:, None, :] * valid[..., None].to(x.dtype)  # (B, T, D)
