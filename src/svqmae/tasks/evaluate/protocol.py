"""SUPERB-style evaluation of frozen features: ``svqmae evaluate``.

The protocol (SUPERB, Yang et al. 2021), with the upstream frozen:

- features of every layer are extracted once and cached on disk, keyed by upstream and file;
- a learnable softmax-weighted sum of all hidden layers (each standardized with training-set
  statistics) feeds a small head;
- utterance tasks (``classify``, ``ks``, ``er``): padding-aware mean pooling and one linear layer;
- ``asr``: a two-layer BiLSTM with CTC over characters, greedy decoding, WER and CER (jiwer);
- model selection on a dev set; without one, part of train is held out by speaker;
- the score comes with a 95% bootstrap interval over test items.

Mean pooling commutes with the layer sum, so utterance tasks cache one pooled vector per layer and
file; ASR caches frame sequences (float16).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .data import DataError, cut_path, load_cut, load_source
from .upstreams import SAMPLE_RATE, Upstream, get_upstream


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tasks and options


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "utterance" | "ctc"
    metric: str
    balanced: bool = False  # class-balanced loss (SUPERB KS samples classes evenly)
    default_folds: int = 0  # k-fold cross-validation when no test set is given
    fold_by: str = "speaker"


TASKS = {
    "classify": TaskSpec("utterance", "accuracy"),
    "ks": TaskSpec("utterance", "accuracy", balanced=True),
    "er": TaskSpec("utterance", "accuracy", default_folds=5, fold_by="session"),
    "asr": TaskSpec("ctc", "cer"),
}

DEFAULTS = dict(
    seed=0,  # head initialization, batch order, dev split and bootstrap
    epochs=100,  # utterance heads: at most this many epochs, early-stopped on dev accuracy
    patience=10,
    lr=1e-3,
    batch_size=32,
    dev_fraction=0.1,  # share of train held out (by speaker) when no dev set is given
    folds=None,  # k-fold cross-validation over train, grouped by fold_by (instead of a test set)
    fold_by=None,  # "speaker" or "session" (a ``session`` column of the manifest)
    cache=None,  # feature cache folder (default: OUT_DIR/features, else ~/.cache/svqmae/features)
    device=None,  # extraction device (default: cuda when available)
    bootstrap=1000,  # bootstrap resamples for the 95% interval
    asr_hidden=256,  # BiLSTM units per direction
    asr_epochs=40,
    asr_patience=6,
    asr_batch_size=16,
    max_batch_seconds=60.0,  # audio per extraction batch
    progress=True,
)


def _options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"evaluate: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(DEFAULTS)})")
    o = dict(DEFAULTS)
    o.update({k: v for k, v in options.items() if v is not None})
    return o


# --------------------------------------------------------------------------- data


@dataclass
class Item:
    cut: object
    path: str
    label: str | None
    text: str | None
    speaker: str | None
    session: str | None = None
    key: str = field(default="")  # cache key of the audio segment


def _file_key(cut) -> str:
    p = Path(cut_path(cut)).resolve()
    st = p.stat()
    ident = f"{p}|{st.st_size}|{st.st_mtime_ns}|{cut.start:.4f}|{cut.duration:.4f}"
    return hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()


def _session_column(src: Path) -> dict[str, str]:
    """path -> ``session`` from a TSV/CSV manifest's optional ``session`` column (SUPERB ER folds)."""
    if not src.is_file() or src.suffix.lower() not in (".tsv", ".csv", ".txt"):
        return {}
    text = src.read_text(encoding="utf-8-sig")
    delim = "\t" if "\t" in text.splitlines()[0] else ","
    rows = csv.DictReader(text.splitlines(), delimiter=delim)
    return {r["path"].strip(): r["session"] for r in rows if r.get("session") and r.get("path")}


def load_items(src: str | Path, task: str) -> list[Item]:
    """Read a source strictly (an unreadable file is an error naming it) and check what the task needs."""
    spec = TASKS[task]
    cuts = load_source(src)
    sessions = _session_column(Path(src))
    items = []
    for cut in cuts:
        sup = cut.supervisions[0] if cut.supervisions else None
        custom = (sup.custom or {}) if sup is not None else {}
        item = Item(cut=cut, path=cut_path(cut), label=custom.get("label"),
                    text=(sup.text or "").strip() or None if sup is not None else None,
                    speaker=sup.speaker if sup is not None else None, session=sessions.get(cut.id))
        if spec.kind == "utterance" and item.label is None:
            raise DataError(f"{item.path}: no label (task {task} needs a 'label' column in {src})")
        if spec.kind == "ctc" and not item.text:
            raise DataError(f"{item.path}: no transcript (task asr needs a 'text' column in {src})")
        item.key = _file_key(cut)
        items.append(item)
    return items


def _rank(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")


def split_dev(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item], str]:
    """Hold out about ``fraction`` of ``items`` for model selection: whole speakers when there are at
    least two, random items otherwise (and for items without a speaker). -> (train, dev, how)."""
    speakers = sorted({it.speaker for it in items if it.speaker}, key=lambda s: _rank(seed, s))
    with_spk = [it for it in items if it.speaker]
    held: set[str] = set()
    how = "random"
    if len(speakers) >= 2:
        how = "speaker"
        count = {s: 0 for s in speakers}
        for it in with_spk:
            count[it.speaker] += 1
        total = 0
        for s in speakers[:-1]:  # keep at least one speaker for training
            if total >= fraction * len(with_spk):
                break
            held.add(s)
            total += count[s]
    dev_ids = {id(it) for it in with_spk if it.speaker in held}
    random_pool = [it for it in items if not it.speaker or how == "random"]
    random_pool.sort(key=lambda it: _rank(seed, it.key + it.path))
    dev_ids |= {id(it) for it in random_pool[: int(round(fraction * len(random_pool)))]}
    train = [it for it in items if id(it) not in dev_ids]
    dev = [it for it in items if id(it) in dev_ids]
    if not dev or not train:
        raise DataError(f"{items[0].path}: too few items ({len(items)}) to hold out a dev set; give --dev")
    return train, dev, how


def make_folds(items: list[Item], k: int, by: str, seed: int, src: str) -> list[list[int]]:
    """Indices of ``items`` in ``k`` folds; each group (speaker or session) lies in one fold.
    Groups are dealt largest first into the emptiest fold, in a seeded order."""
    def group(it: Item) -> str:
        g = it.session if by == "session" else it.speaker
        if not g:
            raise DataError(f"{it.path}: no {by} for {by}-wise folds (add a '{by}' column to {src})")
        return g

    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(group(it), []).append(i)
    if len(groups) < k:
        raise DataError(f"{src}: {k} folds need at least {k} {by}s, found {len(groups)}")
    order = sorted(groups, key=lambda g: (-len(groups[g]), _rank(seed, g)))
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        min(folds, key=len).extend(groups[g])
    return folds


def check_labels(train: list[Item], test: list[Item], train_src: str, test_src: str) -> None:
    known = {it.label for it in train}
    missing = sorted({it.label for it in test} - known)
    if missing:
        raise DataError(
            f"{test_src}: label(s) {', '.join(map(repr, missing))} do not occur in the training data {train_src} "
            f"(it has {', '.join(sorted(known))})"
        )


# --------------------------------------------------------------------------- features


class FeatureStore:
    """Features of every layer, extracted once per (upstream, file) and kept as ``.npy`` files:
    ``ROOT/UPSTREAM_KEY/mean/FILE_KEY.npy`` (L, D) float32 pooled, or ``.../frames/FILE_KEY.npy``
    (T, L, D) float16."""

    def __init__(self, root: Path, upstream: Upstream, max_batch_seconds: float = 60.0, progress: bool = True):
        self.root = Path(root) / upstream.key
        self.upstream = upstream
        self.max_batch_seconds = max_batch_seconds
        self.progress = progress
        self.extracted = 0
        self.cached = 0

    def _path(self, kind: str, item: Item) -> Path:
        return self.root / kind / f"{item.key}.npy"

    def get(self, items: list[Item], kind: str) -> list[np.ndarray]:
        todo = [it for it in items if not self._path(kind, it).is_file()]
        self.cached += len(items) - len(todo)
        if todo:
            self._extract(todo, kind)
        return [np.load(self._path(kind, it)) for it in items]

    def _batches(self, items: list[Item]):
        items = sorted(items, key=lambda it: it.cut.duration)
        batch, longest = [], 0.0
        single = not self.upstream.batch_invariant
        for it in items:
            longest = max(longest, it.cut.duration)
            if batch and (single or (len(batch) + 1) * longest > self.max_batch_seconds):
                yield batch
                batch, longest = [], it.cut.duration
            batch.append(it)
        if batch:
            yield batch

    @torch.no_grad()
    def _extract(self, items: list[Item], kind: str) -> None:
        (self.root / kind).mkdir(parents=True, exist_ok=True)
        up, dev = self.upstream, self.upstream.device
        t0 = t_log = time.monotonic()
        done, audio = 0, 0.0
        for batch in self._batches(items):
            waves = [torch.from_numpy(load_cut(it.cut, SAMPLE_RATE)) for it in batch]
            lengths = torch.tensor([len(w) for w in waves])
            x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(dev)
            hidden, frames = up(x, lengths.to(dev))  # (L, B, T, D), (B,)
            hidden, frames = hidden.float().cpu(), frames.cpu()
            for b, it in enumerate(batch):
                n = int(frames[b])
                if n < 1:
                    raise DataError(f"{it.path}: too short for {up.name} ({it.cut.duration:.3f} s gives no frames)")
                h = hidden[:, b, :n]  # (L, n, D)
                arr = h.mean(1).numpy() if kind == "mean" else h.transpose(0, 1).numpy().astype(np.float16)
                tmp = self._path(kind, it).with_suffix(f".tmp{os.getpid()}.npy")
                np.save(tmp, arr)
                os.replace(tmp, self._path(kind, it))
            done += len(batch)
            audio += float(lengths.sum()) / SAMPLE_RATE
            now = time.monotonic()
            if self.progress and (now - t_log > 10 or done == len(items)):
                t_log = now
                log(f"  features [{up.name}]: {done}/{len(items)} files, {audio / max(now - t0, 1e-9):.0f} audio-s/s")
        self.extracted += len(items)


# --------------------------------------------------------------------------- heads


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


def fit_utterance(Xtr, ytr, Xdev, ydev, n_classes: int, o: dict, balanced: bool) -> tuple[UtteranceHead, dict]:
    """Linear probe on pooled layers. X: (N, L, D) float tensors, y: (N,) long."""
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
    return head, {"dev_accuracy": round(best, 4), "epochs": epochs}


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
    """BiLSTM-CTC head. F*: lists of (T, L, D) arrays; T*: transcripts."""
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


@torch.no_grad()
def transcribe(head: CTCHead, feats: list[np.ndarray], vocab: list[str], bs: int = 32) -> list[str]:
    hyps = []
    for i in range(0, len(feats), bs):
        x, lengths = _pad_frames(feats[i : i + bs])
        logp, out_len = head(x, lengths)
        hyps += greedy_decode(logp, out_len, vocab)
    return hyps


# --------------------------------------------------------------------------- metrics


def bootstrap_ci(num: np.ndarray, den: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of sum(num)/sum(den) (or mean(num)) over test items resampled with replacement."""
    num = np.asarray(num, dtype=np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    stats = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def edit_counts(refs: list[str], hyps: list[str], unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance (errors, reference length) in characters or words."""
    import jiwer

    proc = jiwer.process_characters if unit == "char" else jiwer.process_words
    errs, lens = [], []
    for r, h in zip(refs, hyps):
        o = proc(r, h)
        errs.append(o.substitutions + o.deletions + o.insertions)
        lens.append(o.substitutions + o.deletions + o.hits)
    return np.array(errs), np.array(lens)


# --------------------------------------------------------------------------- running a task


def _stack_pooled(feats: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(feats)).float()


def _dev_for(train: list[Item], dev: list[Item] | None, o: dict):
    if dev is not None:
        return train, dev, "given"
    return split_dev(train, o["dev_fraction"], o["seed"])


def run_utterance(spec: TaskSpec, store: FeatureStore, train: list[Item], test: list[Item] | None,
                  dev: list[Item] | None, o: dict, srcs: dict) -> dict:
    labels = sorted({it.label for it in train})
    lab_index = {lab: i for i, lab in enumerate(labels)}
    folds = o["folds"] or (spec.default_folds if test is None else 0)
    if folds and test is not None:
        raise ConfigError("evaluate: give either a test set or --folds, not both")
    if test is None and not folds:
        raise ConfigError("evaluate: give a test set (--test) or --folds K for k-fold cross-validation")
    if folds:
        by = o["fold_by"] or spec.fold_by
        if by == "session" and not all(it.session for it in train):
            log("  no 'session' column: folds are speaker-wise")
            by = "speaker"
        fold_idx = make_folds(train, folds, by, o["seed"], srcs["train"])
        splits = [(f"fold {k + 1}", [i for j, f in enumerate(fold_idx) if j != k for i in f], idx)
                  for k, idx in enumerate(fold_idx)]
        pool = train
    else:
        check_labels(train, test, srcs["train"], srcs["test"])
        pool = train + test
        splits = [("test", list(range(len(train))), list(range(len(train), len(pool))))]
    if dev is not None:
        check_labels(train, dev, srcs["train"], srcs["dev"])
    feats = store.get(pool + (dev or []), "mean")
    X = _stack_pooled(feats[: len(pool)])
    Xdev_given = _stack_pooled(feats[len(pool):]) if dev else None
    y = torch.tensor([lab_index.get(it.label, -1) for it in pool])

    pos = {id(it): i for i, it in enumerate(pool)}
    truth, pred, weights, runs = [], [], [], []
    for name, tr_idx, te_idx in splits:
        tr_items = [pool[i] for i in tr_idx]
        if folds:
            check_labels(tr_items, [pool[i] for i in te_idx], f"{srcs['train']} without {name}",
                         f"{name} of {srcs['train']}")
        if dev is not None:
            fit_idx, Xdev, ydev, how = tr_idx, Xdev_given, torch.tensor([lab_index[it.label] for it in dev]), "given"
        else:
            fit_items, dev_items, how = split_dev(tr_items, o["dev_fraction"], o["seed"])
            fit_idx, dev_idx = [pos[id(it)] for it in fit_items], [pos[id(it)] for it in dev_items]
            Xdev, ydev = X[dev_idx], y[dev_idx]
        if o["progress"]:
            log(f"  {name}: training a linear head on {len(fit_idx)} items, selecting on {len(ydev)} ({how} dev split)")
        head, info = fit_utterance(X[fit_idx], y[fit_idx], Xdev, ydev, len(labels), o, spec.balanced)
        with torch.no_grad():
            p = head(X[te_idx]).argmax(-1)
        truth.append(y[te_idx])
        pred.append(p)
        weights.append(head.mix.weights().detach().numpy())
        runs.append({"split": name, "train": len(fit_idx), "dev": len(ydev), "dev_split": how,
                     "test": len(te_idx), "accuracy": round(float((p == y[te_idx]).float().mean()), 4), **info})
    truth_t, pred_t = torch.cat(truth).numpy(), torch.cat(pred).numpy()
    correct = (truth_t == pred_t).astype(np.float64)
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(confusion, (truth_t, pred_t), 1)
    return {
        "metric": "accuracy", "value": round(float(correct.mean()), 4),
        "ci95": bootstrap_ci(correct, n_boot=o["bootstrap"], seed=o["seed"]),
        "n_test": int(len(correct)), "n_train": len(train), "labels": labels, "confusion": confusion.tolist(),
        "layer_weights": [round(float(w), 5) for w in np.mean(weights, 0)],
        "folds": folds or None, "runs": runs,
    }


def _norm_text(t: str) -> str:
    return " ".join(t.split())


def run_ctc(store: FeatureStore, train: list[Item], test: list[Item] | None, dev: list[Item] | None,
            o: dict, srcs: dict) -> dict:
    if test is None:
        raise ConfigError("evaluate: task asr needs a test set (--test)")
    if o["folds"]:
        raise ConfigError("evaluate: --folds is for utterance tasks, not asr")
    fit, dev, how = _dev_for(train, dev, o)
    vocab = sorted({c for it in fit for c in _norm_text(it.text)})
    Ttr = [_norm_text(it.text) for it in fit]
    Tdev = [_norm_text(it.text) for it in dev]
    Tte = [_norm_text(it.text) for it in test]
    unseen = sorted({c for t in Tdev + Tte for c in t} - set(vocab))
    if unseen:  # they count as errors, but the user should know
        log(f"  note: dev/test characters never seen in training: {''.join(unseen[:40])}")
    Fall = store.get(fit + dev + test, "frames")
    Ftr, Fdev, Fte = Fall[: len(fit)], Fall[len(fit): len(fit) + len(dev)], Fall[len(fit) + len(dev):]
    if o["progress"]:
        log(f"  training a BiLSTM-CTC head on {len(fit)} utterances, selecting on {len(dev)} ({how} dev split)")
    head, info = fit_ctc(Ftr, Ttr, Fdev, Tdev, vocab, store.upstream.frame_rate, o)
    hyps = transcribe(head, Fte, vocab)
    import jiwer

    c_err, c_len = edit_counts(Tte, hyps, "char")
    w_err, w_len = edit_counts(Tte, hyps, "word")
    cer, wer = float(jiwer.cer(Tte, hyps)), float(jiwer.wer(Tte, hyps))
    return {
        "metric": "cer", "value": round(cer, 4),
        "ci95": bootstrap_ci(c_err, c_len, n_boot=o["bootstrap"], seed=o["seed"]),
        "n_test": len(test), "n_train": len(fit),
        "cer": round(cer, 4), "wer": round(wer, 4),
        "wer_ci95": bootstrap_ci(w_err, w_len, n_boot=o["bootstrap"], seed=o["seed"]),
        "vocab": "".join(vocab), "layer_weights": [round(float(w), 5) for w in head.mix.weights().detach()],
        "runs": [{"split": "test", "train": len(fit), "dev": len(dev), "dev_split": how, "test": len(test), **info}],
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(Tte, hyps))[:5]],
    }


# --------------------------------------------------------------------------- reports and plots


def _report_path(out: str | Path) -> Path:
    p = Path(out)
    return p if p.suffix == ".json" else p / "report.json"


def plot_report(report: dict, json_path: Path) -> dict:
    """``STEM_layers.png`` (layer weights) and, for classification, ``STEM_confusion.png`` next to the report."""
    from .plots import plt

    files = {}
    w = report["layer_weights"]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(w) + 2), 3))
    ax.bar(range(len(w)), w, color="tab:blue")
    ax.set(xlabel="layer (0 = input embedding)", ylabel="softmax weight", xticks=range(len(w)),
           title=f"{report['task']}: layer weights of {report['upstream']['name']}")
    fig.tight_layout()
    files["layers_png"] = str(json_path.with_name(f"{json_path.stem}_layers.png"))
    fig.savefig(files["layers_png"], dpi=100)
    plt.close(fig)
    if "confusion" in report:
        labels, cm = report["labels"], np.array(report["confusion"], dtype=float)
        rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        n = len(labels)
        fig, ax = plt.subplots(figsize=(min(3 + 0.45 * n, 20), min(2.5 + 0.45 * n, 20)))
        im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if rows[i, j] > 0.5 else "black")
        ax.set(xlabel="predicted", ylabel="true",
               title=f"{report['task']} {report['upstream']['name']}: accuracy {100 * report['value']:.1f}%")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        files["confusion_png"] = str(json_path.with_name(f"{json_path.stem}_confusion.png"))
        fig.savefig(files["confusion_png"], dpi=100)
        plt.close(fig)
    return files


def _cell(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_table(reports: list[dict]) -> str:
    """Models as rows, tasks as columns; accuracy or CER in %, with the 95% bootstrap interval."""
    tasks = list(dict.fromkeys((r["task"], r["metric"]) for r in reports))
    models = list(dict.fromkeys(r["model"] for r in reports))
    cell = {(r["model"], r["task"], r["metric"]): _cell(r) for r in reports}
    lines = ["| model | " + " | ".join(f"{t} {m} % [95% CI]" for t, m in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(cell.get((m, t, k), "-") for t, k in tasks) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the API


def _default_cache(out: str | Path | None) -> Path:
    if out is not None:
        return _report_path(out).parent / "features"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "svqmae" / "features"


def evaluate(model: str | Upstream, task: str, train: str, test: str | None = None, dev: str | None = None,
             out: str | None = None, **options) -> dict:
    """Evaluate frozen features of ``model`` on ``task`` the SUPERB way; returns the report.

    ``model``: an svqmae model/run folder, ``fbank``, ``random[:PRESET]`` or ``hf:PATH`` (or an
    :class:`~svqmae.upstreams.Upstream` already loaded, to evaluate one model on several tasks).
    ``task``: ``classify`` / ``ks`` / ``er`` (label column) or ``asr`` (text column).
    ``out``: a ``.json`` path or a folder (then ``FOLDER/report.json``); plots go next to it.
    ``options``: see ``DEFAULTS`` (seed, epochs, lr, folds, fold_by, cache, device, ...).

    The report holds at least task, metric, value, ci95, n_test, upstream and layer_weights."""
    if task not in TASKS:
        raise ConfigError(f"evaluate: unknown task {task!r} (choose from {', '.join(TASKS)})")
    o = _options(options)
    spec = TASKS[task]
    t0 = time.monotonic()
    device = o["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    srcs = {"train": str(train), "test": str(test) if test else None, "dev": str(dev) if dev else None}
    train_items = load_items(train, task)
    test_items = load_items(test, task) if test else None
    dev_items = load_items(dev, task) if dev else None
    upstream = model if isinstance(model, Upstream) else get_upstream(model, device)
    if o["progress"]:
        log(f"evaluate {task} with {upstream.name} ({upstream.num_layers} layers x {upstream.dim}): "
            f"train {len(train_items)}" + (f", test {len(test_items)}" if test_items else "")
            + (f", dev {len(dev_items)}" if dev_items else ""))
    store = FeatureStore(Path(o["cache"]) if o["cache"] else _default_cache(out), upstream,
                         o["max_batch_seconds"], o["progress"])
    rng_state = torch.random.get_rng_state()
    try:
        if spec.kind == "utterance":
            result = run_utterance(spec, store, train_items, test_items, dev_items, o, srcs)
        else:
            result = run_ctc(store, train_items, test_items, dev_items, o, srcs)
    finally:
        torch.random.set_rng_state(rng_state)
    report = {
        "task": task, "model": getattr(upstream, "spec", upstream.name), **result, "upstream": upstream.describe(),
        "data": srcs, "features": {"extracted": store.extracted, "from_cache": store.cached, "cache": str(store.root)},
        "options": {k: o[k] for k in ("seed", "epochs", "patience", "lr", "batch_size", "dev_fraction")},
        "seconds": round(time.monotonic() - t0, 1),
    }
    if out is not None:
        path = _report_path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        report["files"] = {"report": str(path), **plot_report(report, path)}
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if o["progress"]:
        lo, hi = report["ci95"]
        log(f"{task} {upstream.name}: {report['metric']} {100 * report['value']:.2f}% "
            f"[{100 * lo:.2f}, {100 * hi:.2f}] on {report['n_test']} test items"
            + (f" -> {report['files']['report']}" if out else ""))
    return report


# --------------------------------------------------------------------------- the command


def _per_task(values: list[str] | None, tasks: list[str], flag: str) -> list[str | None]:
    if not values:
        return [None] * len(tasks)
    if len(values) == 1:
        return values * len(tasks)
    if len(values) != len(tasks):
        raise ConfigError(f"evaluate: give {flag} once, or once per --task ({len(tasks)} tasks, {len(values)} {flag})")
    return [None if v == "-" else v for v in values]  # "-": none for that task (e.g. er with --folds)


def _run_name(model: str, task: str) -> str:
    p = Path(model.removeprefix("hf:"))
    name = p.parent.name if p.name == "model" else p.name
    prefix = "hf-" if model.startswith("hf:") else ""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in prefix + name) or "model"
    return f"{task}_{slug}"


def cmd_evaluate(args) -> None:
    tasks, models = args.task, list(dict.fromkeys(args.model))
    trains = _per_task(args.train, tasks, "--train")
    tests = _per_task(args.test, tasks, "--test")
    devs = _per_task(args.dev, tasks, "--dev")
    options = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    options["progress"] = not args.quiet
    runs = [(m, t, tr, te, dv) for m in models for t, tr, te, dv in zip(tasks, trains, tests, devs)]
    single = len(runs) == 1
    out = Path(args.out)
    if not single and out.suffix == ".json":
        raise ConfigError(f"{out}: several models or tasks write several reports; give a folder as --out")
    if not single:
        options.setdefault("cache", str(out / "features"))
    reports = []
    device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    for m in models:
        upstream = get_upstream(m, device)  # loaded once for all its tasks
        for mm, t, tr, te, dv in runs:
            if mm == m:
                dest = out if single else out / _run_name(m, t)
                reports.append(evaluate(upstream, t, tr, te, dv, out=str(dest), **options))
        del upstream
    table = markdown_table(reports)
    print(table)
    table_path = (out.parent / f"{out.stem}.md") if single and out.suffix == ".json" else out / "results.md"
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table + "\n")


def add_cli(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="SUPERB-style evaluation of frozen features (keyword spotting, emotion, ASR, ...)",
        description="Frozen upstream, cached features, weighted sum of layers, small head; report.json with "
                    "a 95% bootstrap interval, plots, and a markdown table for several models or tasks.",
    )
    p.add_argument("--model", action="append", required=True, metavar="M",
                   help="svqmae model/ or run DIR, fbank, random[:PRESET], or hf:PATH (repeatable)")
    p.add_argument("--task", action="append", required=True, choices=sorted(TASKS),
                   help="classify (label column), ks, er (SUPERB settings), asr (text column) (repeatable)")
    p.add_argument("--train", action="append", required=True, metavar="SRC",
                   help="training data: TSV manifest or folder (once, or once per --task)")
    p.add_argument("--test", action="append", metavar="SRC", help="test data (once, or once per --task; '-' for none, e.g. er with folds)")
    p.add_argument("--dev", action="append", metavar="SRC",
                   help="dev data for model selection (default: hold out part of train by speaker)")
    p.add_argument("--out", default="evaluation", metavar="PATH",
                   help="report .json (one model and task) or folder (default: evaluation/)")
    p.add_argument("--cache", metavar="DIR", help="feature cache folder (default: next to the report)")
    p.add_argument("--folds", type=int, help="k-fold cross-validation over --train instead of --test (er: 5)")
    p.add_argument("--fold-by", dest="fold_by", choices=["speaker", "session"],
                   help="fold groups (er default: session column if present, else speaker)")
    p.add_argument("--device", help="extraction device (default: cuda if available)")
    p.add_argument("--seed", type=int, help="seed of heads, dev split and bootstrap (default 0)")
    p.add_argument("--epochs", type=int, help="max epochs of utterance heads (default 100)")
    p.add_argument("--asr-epochs", dest="asr_epochs", type=int, help="max epochs of the ASR head (default 40)")
    p.add_argument("--asr-hidden", dest="asr_hidden", type=int, help="BiLSTM units per direction (default 256)")
    p.add_argument("--lr", type=float, help="head learning rate (default 1e-3)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="utterance head batch size (default 32)")
    p.add_argument("--dev-fraction", dest="dev_fraction", type=float,
                   help="share of train held out by speaker when there is no --dev (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_evaluate)
