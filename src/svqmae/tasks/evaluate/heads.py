"""The downstream heads trained on frozen features (SUPERB): a learnable softmax-weighted sum of the
layers, mean pooling + linear for utterance tasks, a 2-layer BiLSTM with CTC for ASR; training with
early stopping on the dev set.

Shapes: B batch, L layers, T frames, D width, C classes, V vocabulary.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .items import log


class LayerMix(nn.Module):
    """Softmax-weighted sum of all layers, each standardized by fixed training-set statistics.
    x: (..., L, D) -> (..., D)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())  # (L, D)
        self.register_buffer("std", std.float().clamp_min(1e-5))
        self.logits = nn.Parameter(torch.zeros(mean.shape[0]))

    def weights(self) -> torch.Tensor:
        return self.logits.softmax(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return torch.einsum("...ld,l->...d", x, self.weights())


class UtteranceHead(nn.Module):
    """Mean-pooled layers (B, L, D) -> layer mix -> linear -> logits (B, C)."""

    def __init__(self, mean, std, n_classes: int):
        super().__init__()
        self.mix = LayerMix(mean, std)
        self.linear = nn.Linear(mean.shape[1], n_classes)

    def forward(self, x):
        return self.linear(self.mix(x))


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of x (B, T, D) within its length; padding stays at the end."""
    t = torch.arange(x.shape[1], device=x.device)[None]
    n = lengths.to(x.device)[:, None]
    idx = torch.where(t < n, n - 1 - t, t)
    return x.gather(1, idx[..., None].expand_as(x))


class BiLSTM(nn.Module):
    """Bidirectional LSTM that ignores padding exactly, without packed sequences (4x slower on CPU):
    the backward direction runs forward over each sequence reversed within its length."""

    def __init__(self, dim: int, hidden: int, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        dims = [dim] + [2 * hidden] * (layers - 1)
        self.fwd = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in dims)
        self.bwd = nn.ModuleList(nn.LSTM(d, hidden, batch_first=True) for d in dims)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        for i, (f, b) in enumerate(zip(self.fwd, self.bwd)):
            if i:
                x = self.drop(x)
            x = torch.cat([f(x)[0], reverse_padded(b(reverse_padded(x, lengths))[0], lengths)], dim=-1)
        return x


class CTCHead(nn.Module):
    """Frames (B, T, L, D) -> layer mix -> (frame repetition up to >= 50 Hz) -> 2-layer BiLSTM -> linear
    over characters + blank (index 0)."""

    def __init__(self, mean, std, vocab_size: int, hidden: int, upsample: int):
        super().__init__()
        self.mix = LayerMix(mean, std)
        self.upsample = upsample
        self.lstm = BiLSTM(mean.shape[1], hidden)
        self.out = nn.Linear(2 * hidden, vocab_size + 1)

    def forward(self, x, lengths):
        """-> log-probabilities (B, T', V+1), lengths (B,)."""
        h = self.mix(x)
        if self.upsample > 1:
            h, lengths = h.repeat_interleave(self.upsample, dim=1), lengths * self.upsample
        return self.out(self.lstm(h, lengths)).log_softmax(-1), lengths


# --------------------------------------------------------------------------- training


def _early_stopping(head: nn.Module, opt, epochs: int, patience: int, run_epoch, score, what: str, progress: bool):
    """Train ``epochs`` at most, keep the state with the best dev ``score()`` (higher is better)."""
    best, best_state, bad = -math.inf, None, 0
    for epoch in range(1, epochs + 1):
        head.train()
        loss = run_epoch()
        head.eval()
        with torch.no_grad():
            s = score()
        if s > best:
            best, bad = s, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            bad += 1
        if progress and (epoch == 1 or epoch % 10 == 0 or bad >= patience or epoch == epochs):
            log(f"  head epoch {epoch}: train loss {loss:.3f}, dev {what} {abs(s):.4f} (best {abs(best):.4f})")
        if bad >= patience:
            break
    head.load_state_dict(best_state)
    head.eval()
    return best, epoch


# the learning rates ``--lr auto`` tries (SUPERB sweeps the downstream learning rate per upstream and
# task: rankings flip without it); linear probes are cheap, the BiLSTM-CTC head is not
# (1e-4 was tried too: it never won on the shared sets and cost the most epochs)
LR_GRID = {"utterance": (3e-4, 1e-3, 3e-3, 1e-2), "ctc": (3e-4, 1e-3, 3e-3)}


def with_lr_search(fit, kind: str):
    """``fit(..., o)`` -> the same with ``o["lr"] == "auto"`` meaning: fit once per learning rate of
    ``LR_GRID[kind]`` and keep the head with the best dev score (the first best on a tie). The info
    dict gets ``lr`` (the choice) and ``lr_search`` (dev score per learning rate)."""

    def fit_best(*args):
        o = args[-1]
        if o["lr"] != "auto":
            head, info = fit(*args)
            return head, {"lr": float(o["lr"]), **info}
        fits = [(lr, *fit(*args[:-1], {**o, "lr": lr, "progress": False})) for lr in LR_GRID[kind]]
        return pick_best(fits, kind, o["progress"])

    return fit_best


def pick_best(fits: list[tuple[float, nn.Module, dict]], kind: str, progress: bool) -> tuple[nn.Module, dict]:
    """(lr, head, info) per learning rate -> the head with the best dev score (the first on a tie)."""
    key = "dev_accuracy" if kind == "utterance" else "dev_cer"
    sign = 1 if kind == "utterance" else -1
    scores = {f"{lr:g}": info[key] for lr, _, info in fits}
    lr, head, info = max(fits, key=lambda f: (sign * f[2][key], -fits.index(f)))
    if progress:
        log(f"  learning rate {lr:g} chosen on dev ({'accuracy' if kind == 'utterance' else 'CER'} per lr: "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + ")")
    return head, {"lr": lr, "lr_search": scores, **info}


def fit_utterance(Xtr, ytr, Xdev, ydev, n_classes: int, balanced: bool, o: dict) -> tuple[UtteranceHead, dict]:
    """Linear probe on pooled layers (one learning rate). X: (N, L, D) float tensors, y: (N,) long."""
    torch.manual_seed(o["seed"])
    head = UtteranceHead(Xtr.mean(0), Xtr.std(0), n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=o["lr"], weight_decay=1e-4)
    weight = None
    if balanced:
        counts = torch.bincount(ytr, minlength=n_classes).float()
        weight = counts.sum() / (n_classes * counts.clamp_min(1))
    g = torch.Generator().manual_seed(o["seed"])
    bs = o["batch_size"]

    def run_epoch():
        total = 0.0
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(head(Xtr[idx]), ytr[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        return total / len(ytr)

    def score():  # dev accuracy, ties broken by dev loss
        logits = head(Xdev)
        return float((logits.argmax(-1) == ydev).float().mean()) - 1e-6 * float(F.cross_entropy(logits, ydev))

    best, epochs = _early_stopping(head, opt, o["epochs"], o["patience"], run_epoch, score, "accuracy", o["progress"])
    return head, {"dev_accuracy": abs(round(best, 4)), "epochs": epochs}  # abs: no -0.0 when nothing is right


def _pad_frames(feats: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(f) for f in feats])
    x = torch.zeros(len(feats), int(lengths.max()), *feats[0].shape[1:])
    for i, f in enumerate(feats):
        x[i, : len(f)] = torch.from_numpy(f.astype(np.float32))
    return x, lengths


def greedy_decode(logp: torch.Tensor, lengths: torch.Tensor, vocab: list[str]) -> list[str]:
    out = []
    for seq, n in zip(logp.argmax(-1), lengths):
        ids = torch.unique_consecutive(seq[: int(n)])
        out.append("".join(vocab[i - 1] for i in ids.tolist() if i > 0))
    return out


def fit_ctc(Ftr, Ttr, Fdev, Tdev, vocab: list[str], frame_rate: float, o: dict) -> tuple[CTCHead, dict]:
    """BiLSTM-CTC head (one learning rate). F*: lists of (T, L, D) arrays; T*: transcripts."""
    import jiwer

    torch.manual_seed(o["seed"])
    frames = np.concatenate([f.astype(np.float32) for f in Ftr])  # (sum T, L, D)
    mean, std = torch.from_numpy(frames.mean(0)), torch.from_numpy(frames.std(0))
    del frames
    upsample = max(1, math.ceil(50 / frame_rate - 1e-6))
    head = CTCHead(mean, std, len(vocab), o["asr_hidden"], upsample)
    opt = torch.optim.AdamW(head.parameters(), lr=o["lr"], weight_decay=1e-4)
    index = {c: i + 1 for i, c in enumerate(vocab)}
    targets = [torch.tensor([index[c] for c in t]) for t in Ttr]
    g = torch.Generator().manual_seed(o["seed"])
    bs = o["asr_batch_size"]

    def run_epoch():
        total = 0.0
        perm = torch.randperm(len(Ftr), generator=g).tolist()
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            x, lengths = _pad_frames([Ftr[j] for j in idx])
            logp, out_len = head(x, lengths)
            tgt = [targets[j] for j in idx]
            loss = F.ctc_loss(logp.transpose(0, 1), torch.cat(tgt), out_len, torch.tensor([len(t) for t in tgt]),
                              blank=0, zero_infinity=True)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 5.0)
            opt.step()
            total += loss.item() * len(idx)
        return total / len(Ftr)

    def score():
        return -jiwer.cer(list(Tdev), transcribe(head, Fdev, vocab))

    best, epochs = _early_stopping(head, opt, o["asr_epochs"], o["asr_patience"], run_epoch, score, "CER",
                                   o["progress"])
    return head, {"dev_cer": round(-best, 4), "epochs": epochs, "upsample": upsample}




fit_utterance_head = with_lr_search(fit_utterance, "utterance")


fit_ctc_head = with_lr_search(fit_ctc, "ctc")


@torch.no_grad()
def transcribe(head: CTCHead, feats: list[np.ndarray], vocab: list[str], bs: int = 32) -> list[str]:
    hyps = []
    for i in range(0, len(feats), bs):
        x, lengths = _pad_frames(feats[i : i + bs])
        logp, out_len = head(x, lengths)
        hyps += greedy_decode(logp, out_len, vocab)
    return hyps


# --------------------------------------------------------------------------- metrics
