"""The feature store: every layer's features of a frozen upstream, extracted once per (upstream, file)
and cached on disk as ``.npy`` (pooled vectors for utterance tasks, float16 frames for ASR)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from ...data import DataError, load_cut
from .items import Item, log
from .upstreams import SAMPLE_RATE, Upstream


class FeatureStore:
    """Features of every layer, extracted once per (upstream, file) and kept as ``.npy`` files:
    ``ROOT/UPSTREAM_KEY/mean/FILE_KEY.npy`` (L, D') float32, the real frames pooled by the upstream
    (:meth:`~.upstreams.Upstream.pool`: their mean, or mean and standard deviation), or
    ``.../frames/FILE_KEY.npy`` (T, L, D) float16."""

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
                arr = up.pool(h).numpy() if kind == "mean" else h.transpose(0, 1).numpy().astype(np.float16)
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
