"""Lhotse Shar directories, read: lazily as the training stream, or whole for evaluation sets (written
by :mod:`svqmae.data.shar_writer`, checked by :func:`svqmae.data.sources.check_source`).

A Shar directory is lhotse's own format (:mod:`lhotse.shar`) plus an index svqmae writes beside it::

    DIR/cuts.000000.jsonl.gz     lhotse cuts, start 0, label/text/speaker on the first supervision
    DIR/recording.000000.tar     their audio in the same order: CUT_ID.flac (16 kHz mono) + CUT_ID.json
    DIR/shar_index.json          {"format": "lhotse-shar", "complete": true, "plan": digest,
                                  "shards": [{"cuts", "recording", "count", "seconds", "skipped"}, ...]}
    DIR/skipped_files.tsv        path <TAB> reason, for every file left out

A directory lhotse wrote alone (no index) is read too: its shards are then paired by number. Shard
locations in an index may be relative names, URLs (``s3://``, ``gs://``, ``https://``: lhotse opens
them with smart_open/fsspec) or ``pipe:`` commands; ``--data`` may be such an index or a URL of a
directory holding one.

Training reads a Shar source as a stream (:class:`SharStream`): each epoch the shard order is
shuffled (a pure function of seed and epoch, the same on every process), then split over
nodes x ranks x loader workers ("slots"), so that each cut is read once per epoch across the whole
job; each slot shuffles and duration-buckets its cuts in a buffer of ``buffer_size`` cuts (lhotse's
``DynamicBucketingSampler``). Each batch carries its slot's read position (epoch, unit, offset):
resuming there, no cut is trained on twice in an epoch, and at most the cuts that sat in the
buffers of each worker when the checkpoint was taken are left out of that epoch.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from lhotse import CutSet, MonoCut
from lhotse.dataset import DynamicBucketingSampler
from lhotse.lazy import LazyManifestIterator
from lhotse.serialization import open_best
from lhotse.shar.readers import LazySharIterator

from .common import DataError, Problems, heldout_from_head

INDEX = "shar_index.json"
SAMPLE_RATE = 16000
# what a shard that cannot be read to its end raises while it is streamed
SHARD_ERRORS = (tarfile.TarError, EOFError, OSError, RuntimeError, AssertionError, ValueError, gzip.BadGzipFile)


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def _join(base: str, name: str) -> str:
    """A shard location from an index: absolute ones (URLs, ``pipe:``, ``/...``) as they are."""
    if _is_url(name) or name.startswith("/"):
        return name
    return f"{base.rstrip('/')}/{name}"


def is_shar(src) -> bool:
    """A Shar directory (local, or a URL of one), or a Shar index file."""
    s = str(src)
    if s.endswith(INDEX):
        return True
    if _is_url(s):
        return not s.startswith("pipe:") and "." not in s.rstrip("/").rsplit("/", 1)[-1]
    p = Path(s)
    return p.is_dir() and ((p / INDEX).is_file() or any(p.glob("cuts.*.jsonl.gz")))


# --------------------------------------------------------------------------- reading


@dataclass
class SharSet:
    """The shards of one or more Shar sources, in listed order: each ``{"cuts": loc, "recording": loc}``;
    ``counts`` and ``seconds`` per shard where an index gives them (else None)."""

    where: str
    shards: list[dict[str, str]]
    counts: list[int | None]
    seconds: list[float | None]

    @property
    def num_cuts(self) -> int | None:
        return None if None in self.counts else sum(self.counts)

    @property
    def hours(self) -> float | None:
        return None if None in self.seconds else sum(self.seconds) / 3600

    def describe(self) -> str:
        size = f"{self.num_cuts} cuts ({self.hours:.2f} h) in " if self.num_cuts is not None else ""
        return f"{self.where}: {size}{len(self.shards)} shards"


def read_index(location: str) -> dict:
    try:
        with open_best(location, "r") as f:
            index = json.load(f)
    except Exception as e:
        raise DataError(f"{location}: unreadable Shar index ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise DataError(f"{location}: not a Shar index (no 'shards' list)")
    return index


def open_shar(src) -> SharSet:
    """A Shar source's shards. A local directory is checked: an unfinished ``data shard`` run, or a
    shard its index lists but the disk lacks, is a one-line ``DataError`` naming it."""
    s = str(src)
    local = not _is_url(s)
    if local and Path(s).is_dir() and not (Path(s) / INDEX).is_file():
        return _glob_shards(Path(s))
    index_loc = s if s.endswith(INDEX) else _join(s, INDEX)
    base = index_loc[: -len(INDEX)].rstrip("/") or "."
    index = read_index(index_loc)
    entries = index["shards"]
    if not index.get("complete", True) or any(e is None for e in entries):
        done = sum(e is not None for e in entries)
        raise DataError(f"{base}: unfinished Shar directory ({done} of {len(entries)} shards written); "
                        f"run the same `svqmae data shard` command again to finish it")
    shards = [{"cuts": _join(base, e["cuts"]), "recording": _join(base, e["recording"])} for e in entries]
    for sh in shards:
        for loc in sh.values():
            if not _is_url(loc) and not Path(loc).is_file():
                raise DataError(f"{loc}: shard listed in {index_loc} is missing")
    return SharSet(base, shards, [e.get("count") for e in entries], [e.get("seconds") for e in entries])


def _glob_shards(d: Path) -> SharSet:
    """A directory lhotse wrote (no index): cuts.N.jsonl.gz paired with recording.N.tar by N."""
    cuts = sorted(d.glob("cuts.*.jsonl.gz"))
    if not cuts:
        raise DataError(f"{d}: no Shar shards (cuts.*.jsonl.gz) found")
    shards = []
    for c in cuts:
        rec = d / f"recording.{c.name[len('cuts.'):-len('.jsonl.gz')]}.tar"
        if not rec.is_file():
            raise DataError(f"{rec}: the audio of shard {c.name} is missing")
        shards.append({"cuts": str(c), "recording": str(rec)})
    return SharSet(str(d), shards, [None] * len(shards), [None] * len(shards))


def open_shars(srcs: list) -> SharSet:
    """Several Shar sources as one set of shards (their cut ids must not clash)."""
    sets = [open_shar(s) for s in srcs]
    return SharSet(", ".join(s.where for s in sets), [sh for s in sets for sh in s.shards],
                   [n for s in sets for n in s.counts], [x for s in sets for x in s.seconds])


def iter_shard(shard: dict[str, str], part: int = 0, parts: int = 1, skip: int = 0):
    """(offset, cut) for the cuts of one shard (audio attached, in memory) whose offset in the shard
    is ``>= skip`` and ``% parts == part``. A shard that cannot be read to its end raises one of
    ``SHARD_ERRORS``."""
    reader = LazySharIterator(fields={"cuts": [shard["cuts"]], "recording": [shard["recording"]]})
    for offset, cut in enumerate(reader):
        if offset < skip or offset % parts != part:
            continue
        cut.custom["shar_audio"] = shard["recording"]  # names the tar in error reports (cut_path)
        yield offset, cut


def shard_error(shard: dict[str, str], e: Exception) -> tuple[str, str]:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return shard["recording"], f"{shard['recording']}: truncated or corrupt shard ({msg}); the rest of its cuts skipped"


def read_shar(src, problems: Problems) -> CutSet:
    """A whole Shar source in memory (audio included): for evaluation sets and feature extraction,
    which need every cut anyway. A shard that cannot be read to its end goes to ``problems``."""
    cuts = []
    for shard in open_shar(src).shards:
        try:
            cuts.extend(cut for _, cut in iter_shard(shard))
        except SHARD_ERRORS as e:
            problems.add(*shard_error(shard, e))
    return CutSet.from_cuts(cuts)


def head_cuts(shar: SharSet, n: int, with_audio: bool = True):
    """The first ``n`` cuts in listed shard order (without audio: from the cuts manifests alone)."""
    taken = 0
    for shard in shar.shards:
        it = (c for _, c in iter_shard(shard)) if with_audio else LazyManifestIterator(shard["cuts"])
        for cut in it:
            if taken >= n:
                return
            taken += 1
            yield cut


def shar_heldout(shar: SharSet, n: int, min_seconds: float) -> CutSet:
    """The validation slice of a Shar source, audio in memory, without reading the corpus: see
    :func:`svqmae.data.common.heldout_from_head` (the first ``4 n`` cuts of at least ``min_seconds``)."""
    return heldout_from_head((c for c in head_cuts(shar, 1 << 62) if c.duration >= min_seconds), n)


# --------------------------------------------------------------------------- the training stream


def epoch_units(num_shards: int, slots: int, seed: int, epoch: int) -> list[list[tuple[int, int, int]]]:
    """Which (shard, part, parts) each of ``slots`` loader slots reads in ``epoch``: the shards in a
    seeded random order, dealt round-robin. With fewer shards than slots each shard is read as
    ``parts`` interleaved parts, so that no slot is idle; every cut belongs to exactly one unit."""
    order = list(range(num_shards))
    random.Random(f"shar/{seed}/{epoch}").shuffle(order)
    parts = max(1, math.ceil(slots / max(num_shards, 1)))
    units = [(s, p, parts) for s in order for p in range(parts)]
    return [units[k::slots] for k in range(slots)]


class _SlotReader:
    """The cuts of one slot's units in one epoch, from (unit, offset) on; ``pos`` is where the next
    cut will be read from. A shard that breaks off is noted in ``failed`` and the next one begins."""

    def __init__(self, shar: SharSet, units: list[tuple[int, int, int]], unit: int, offset: int):
        self.shar, self.units, self.start = shar, units, (unit, offset)
        self.pos = (unit, offset)
        self.failed: list[tuple[str, str]] = []

    def __iter__(self):
        unit0, offset0 = self.start
        for u in range(unit0, len(self.units)):
            shard_i, part, parts = self.units[u]
            shard = self.shar.shards[shard_i]
            try:
                for offset, cut in iter_shard(shard, part, parts, offset0 if u == unit0 else 0):
                    self.pos = (u, offset + 1)
                    yield cut
            except SHARD_ERRORS as e:
                self.failed.append(shard_error(shard, e))
            self.pos = (u + 1, 0)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed once initialized, else the launcher's
    environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _keep(exclude: frozenset, min_seconds: float, cut) -> bool:
    return cut.duration >= min_seconds and cut.id not in exclude


def resume_positions(saved: list[dict] | None, rank: int, layout: list[int]) -> dict[int, tuple[int, int, int]]:
    """This rank's workers' start positions {worker: (epoch, unit, offset)} from the positions saved
    in a checkpoint (one entry per rank: {"layout": [world, workers], "workers": {w: pos}}). If the
    job's layout changed, every worker starts the epoch after the earliest one in flight."""
    if not saved:
        return {}
    if all(list(s.get("layout") or []) == list(layout) for s in saved) and rank < len(saved):
        return {int(w): tuple(p) for w, p in saved[rank]["workers"].items()}
    epochs = [p[0] for s in saved for p in s["workers"].values()]
    nxt = (min(epochs) + 1) if epochs else 0
    return {w: (nxt, 0, 0) for w in range(layout[1])}


class SharStream(torch.utils.data.IterableDataset):
    """The endless (or ``epochs``-long) stream of training batches of one rank over a :class:`SharSet`.

    Each item is a :class:`~svqmae.data.loader.WaveformBatches` batch plus ``stream`` =
    {"worker", "layout": [world, workers], "pos": [epoch, unit, offset]} (where this worker will
    read next; see :func:`resume_positions`)."""

    def __init__(self, shar: SharSet, batches, max_batch_seconds: float, duration_bins: list[float], seed: int,
                 buffer_size: int, crop=None, exclude: frozenset = frozenset(), min_seconds: float = 0.0,
                 resume: list[dict] | None = None, epochs: int | None = None):
        super().__init__()
        self.shar, self.batches, self.max_batch_seconds = shar, batches, max_batch_seconds
        self.bins, self.seed, self.buffer_size, self.crop = duration_bins, seed, buffer_size, crop
        self.keep = partial(_keep, frozenset(exclude), min_seconds)
        self.resume, self.epochs = resume, epochs
        self.rank, self.world = dist_info()  # read here, in the training process

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        layout = [self.world, workers]
        slots, slot = self.world * workers, self.rank * workers + worker
        epoch, unit, offset = resume_positions(self.resume, self.rank, layout).get(worker, (0, 0, 0))
        failed: list[tuple[str, str]] = []
        while self.epochs is None or epoch < self.epochs:
            units = epoch_units(len(self.shar.shards), slots, self.seed, epoch)[slot]
            if not units:
                return  # an empty shard set
            reader = _SlotReader(self.shar, units, unit, offset)
            cuts = CutSet(reader).filter(self.keep)
            if self.crop is not None:
                cuts = cuts.map(self.crop)
            sampler = DynamicBucketingSampler(
                cuts, max_duration=self.max_batch_seconds, duration_bins=self.bins, shuffle=True,
                seed=self.seed * 1009 + slot, buffer_size=self.buffer_size, world_size=1, rank=0, drop_last=False)
            sampler.set_epoch(epoch)
            n = 0
            for i, batch in enumerate(sampler):
                out = self.batches[(epoch, i, batch)]
                failed += reader.failed
                reader.failed = []
                out["failed"], failed = out["failed"] + failed, []
                out["stream"] = {"worker": worker, "layout": layout, "pos": [epoch, *reader.pos]}
                n += 1
                yield out
            failed += reader.failed  # reported with the next batch
            if n == 0 and (unit, offset) == (0, 0):
                return  # nothing to train on in a whole epoch
            epoch, unit, offset = epoch + 1, 0, 0


def duration_bins(shar: SharSet, num_buckets: int, max_seconds: float, sample: int = 5000) -> list[float]:
    """Bucket boundaries (seconds) from the durations of the first ``sample`` cuts, read from the
    cuts manifests alone (no audio), counted at most ``max_seconds`` as the loader crops them."""
    from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets

    durations = sorted(min(c.duration, max_seconds) for c in head_cuts(shar, sample, with_audio=False))
    if len(durations) < 2 or num_buckets < 2:
        return []
    probe = [MonoCut(id=str(i), start=0, duration=d, channel=0) for i, d in enumerate(durations)]
    return sorted(set(estimate_duration_buckets(probe, num_buckets=min(num_buckets, len(durations)))))
