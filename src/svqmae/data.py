"""Data sources -> lhotse CutSets -> duration-bucketed batches of 16 kHz waveforms.

A *source* is any of: a folder of audio (searched recursively), a TSV/CSV manifest with a ``path``
column (relative to the manifest's folder; optional ``label``, ``text``, ``speaker``, ``seconds``,
``start``/``end``), or a lhotse CutSet manifest (``*.jsonl.gz`` / ``*.jsonl``).
Label, text and speaker travel on the cut's first supervision.
"""

from __future__ import annotations

import csv
import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet, Recording, SupervisionSegment
from lhotse.audio import AudioSource
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler

from .audio import AUDIO_EXTENSIONS, AudioError, audio_info, read_audio


class DataError(ValueError):
    """A bad data source; the message names the file and the problem."""


@dataclass
class Problems:
    """Files that could not be used, with the reason: (path, reason)."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.items.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------- sources


def _recording(rec_id: str, path: Path) -> Recording:
    sr, frames, channels = audio_info(path)
    return Recording(
        id=rec_id,
        sources=[AudioSource(type="file", channels=list(range(channels)), source=str(path))],
        sampling_rate=sr,
        num_samples=frames,
        duration=frames / sr,
    )


def _probe_all(items: list[tuple[str, Path]], problems: Problems) -> dict[str, Recording]:
    def probe(item):
        try:
            return item[0], _recording(*item), None
        except AudioError as e:
            return item[0], None, str(e)

    out: dict[str, Recording] = {}
    paths = dict(items)
    with ThreadPoolExecutor(8) as pool:
        for rid, rec, err in pool.map(probe, items):
            if rec is None:
                problems.add(str(paths[rid]), err)
            else:
                out[rid] = rec
    return out


def scan_folder(folder: Path, problems: Problems) -> CutSet:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    recs = _probe_all([(str(p.relative_to(folder).with_suffix("")), p) for p in files], problems)
    return CutSet.from_manifests(recordings=_recording_set(recs.values()))


def _recording_set(recs):
    from lhotse import RecordingSet

    return RecordingSet.from_recordings(recs)


def read_manifest(path: Path, problems: Problems) -> CutSet:
    """TSV or CSV with a header holding at least ``path``."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: empty manifest")
    delim = "\t" if "\t" in text.splitlines()[0] else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delim))
    header = rows[0].keys() if rows else text.splitlines()[0].split(delim)
    if "path" not in header:
        raise DataError(f"{path}: manifest has no 'path' column (columns: {', '.join(header)})")
    if not rows:
        raise DataError(f"{path}: manifest has a header but no rows")
    root = path.parent
    items, seen = [], set()
    for i, row in enumerate(rows):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise DataError(f"{path}: row {i + 2} has an empty 'path'")
        rid = rel if rel not in seen else f"{rel}#{i}"
        seen.add(rid)
        items.append((rid, root / rel, row))
    recs = _probe_all([(rid, p) for rid, p, _ in items], problems)
    cuts = []
    for rid, _, row in items:
        rec = recs.get(rid)
        if rec is None:
            continue
        start = float(row.get("start") or 0.0)
        end = float(row["end"]) if row.get("end") else rec.duration
        end = min(end, rec.duration)
        if end <= start:
            problems.add(str(root / rid), f"{root / rid}: segment {start}-{end} s is empty")
            continue
        sup = SupervisionSegment(
            id=rid,
            recording_id=rid,
            start=0.0,
            duration=end - start,
            text=row.get("text") or None,
            speaker=row.get("speaker") or None,
            custom={"label": row["label"]} if row.get("label") else None,
        )
        cut = rec.to_cut().truncate(offset=start, duration=end - start, preserve_id=True)
        sup.start = 0.0
        cut.supervisions = [sup]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def load_source(src: str | Path, problems: Problems | None = None) -> CutSet:
    """Any supported source -> CutSet (eager). Unreadable files go to ``problems`` (or raise)."""
    p = Path(src)
    strict = problems is None
    problems = problems if problems is not None else Problems()
    if not p.exists():
        raise DataError(f"{p}: data source not found")
    if p.is_dir():
        cuts = scan_folder(p, problems)
    elif p.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        try:
            cuts = CutSet.from_file(p).to_eager()
        except Exception as e:
            raise DataError(f"{p}: not a readable lhotse manifest ({e})") from None
    elif p.suffix.lower() in (".tsv", ".csv", ".txt"):
        cuts = read_manifest(p, problems)
    elif p.suffix.lower() in AUDIO_EXTENSIONS:
        cuts = CutSet.from_manifests(recordings=_recording_set([_recording(p.stem, p)]))
    else:
        raise DataError(f"{p}: unknown source kind (a folder, a .tsv/.csv manifest or a lhotse .jsonl.gz)")
    if strict and len(problems):
        raise DataError(problems.items[0][1])
    if len(cuts) == 0:
        raise DataError(f"{p}: no usable audio")
    return cuts


def load_sources(srcs: list[str | Path], problems: Problems) -> CutSet:
    cuts = [c for s in srcs for c in load_source(s, problems)]
    return CutSet.from_cuts(cuts)


# --------------------------------------------------------------------------- batching


def cut_path(cut) -> str:
    return cut.recording.sources[0].source


def load_cut(cut, sample_rate: int = 16000) -> np.ndarray:
    return read_audio(cut_path(cut), sample_rate, offset=cut.start, duration=cut.duration)


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def split_heldout(cuts: CutSet, n: int) -> tuple[CutSet, CutSet]:
    """A deterministic held-out slice of ``n`` cuts (by hash of id); (train, heldout)."""
    ranked = sorted(cuts, key=lambda c: _stable_hash(c.id))
    held = {c.id for c in ranked[: min(n, max(len(ranked) - 1, 0))]}
    return cuts.filter(lambda c: c.id not in held).to_eager(), cuts.filter(lambda c: c.id in held).to_eager()


class EpochBatches(torch.utils.data.Sampler):
    """Wraps a lhotse sampler: yields (epoch, index, CutSet) so that crops are reproducible and a
    resumed run can skip the batches it already trained on."""

    def __init__(self, sampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, cuts in enumerate(self.sampler):
            if i >= skip:
                yield self.epoch, i, cuts


class WaveformBatches(torch.utils.data.Dataset):
    """(epoch, index, CutSet) -> {"waves": (B, S), "lengths": (B,), "ids", "failed", "epoch", "index"}.

    Cuts longer than ``max_seconds`` are randomly cropped (a pure function of seed, epoch and cut
    id); files that fail to load are dropped from the batch and listed in ``failed`` (strict=False),
    or raise (strict=True)."""

    def __init__(self, sample_rate=16000, max_seconds: float | None = None, seed: int = 0, strict=False):
        self.sample_rate, self.max_seconds, self.seed, self.strict = sample_rate, max_seconds, seed, strict

    def __getitem__(self, item):
        epoch, index, cuts = item if isinstance(item, tuple) else (0, 0, item)
        waves, ids, failed = [], [], []
        for cut in cuts:
            full = cut.custom or {}
            offset, dur = full.get("full_start", cut.start), full.get("full_duration", cut.duration)
            if self.max_seconds and dur > self.max_seconds:
                rng = random.Random(f"{self.seed}/{epoch}/{cut.id}")
                offset += rng.uniform(0, dur - self.max_seconds)
                dur = self.max_seconds
            try:
                x = read_audio(cut_path(cut), self.sample_rate, offset=offset, duration=dur)
            except AudioError as e:
                if self.strict:
                    raise
                failed.append((cut_path(cut), str(e)))
                continue
            waves.append(torch.from_numpy(x))
            ids.append(cut.id)
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        batch = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = w
        return {"waves": batch, "lengths": lengths, "ids": ids, "failed": failed, "epoch": epoch, "index": index}


def _crop_view(cut, max_seconds: float):
    """The cut as the sampler should count it (at most ``max_seconds``), remembering its full extent
    so that the loader can pick a random crop."""
    if cut.duration <= max_seconds:
        return cut
    short = cut.truncate(duration=max_seconds, preserve_id=True)
    short.custom = dict(cut.custom or {}, full_start=cut.start, full_duration=cut.duration)
    return short


def pretrain_loader(cuts: CutSet, max_batch_seconds: float, max_utt_seconds: float, num_buckets: int,
                    num_workers: int, seed: int, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """Duration-bucketed dynamic batches, DDP-aware (lhotse reads rank/world size when
    torch.distributed is initialized), loaded in worker processes."""
    # the sampler sees cropped durations, so a batch never holds more than max_batch_seconds of audio
    cropped = CutSet.from_cuts(_crop_view(c, max_utt_seconds) for c in cuts)
    if shuffle:
        sampler = DynamicBucketingSampler(
            cropped, max_duration=max_batch_seconds, num_buckets=max(1, min(num_buckets, len(cuts) // 2)),
            shuffle=True, seed=seed, drop_last=False,
        )
    else:
        sampler = DynamicCutSampler(cropped, max_duration=max_batch_seconds, shuffle=False)
    ds = WaveformBatches(max_seconds=max_utt_seconds, seed=seed)
    return torch.utils.data.DataLoader(
        ds, sampler=EpochBatches(sampler), batch_size=None, num_workers=num_workers,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )
