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

import gc
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
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
from lhotse.audio import AudioSource
from lhotse.dataset import DynamicBucketingSampler
from lhotse.lazy import LazyManifestIterator
from lhotse.serialization import decode_json_line, deserialize_item, open_best

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
    is ``>= skip`` and ``% parts == part``. A shard that cannot be read to its end, or whose tar and
    cuts manifest disagree (other ids, fewer members), raises one of ``SHARD_ERRORS``.

    The cuts lhotse's ``LazySharIterator`` yields (the recording is the tar's JSON member, its source
    the audio bytes), read in a third of its time, which on short cuts was as much as decoding their
    FLAC: the tar is walked by :class:`TarStream` (not :mod:`tarfile`), plain cuts are built by
    :func:`_cut_with_audio`, and cuts not wanted are skipped unparsed."""
    origin = shard["recording"]
    with open_best(shard["cuts"], "r") as lines, _open_tar(origin) as raw:
        tar = TarStream(raw)
        for offset, line in enumerate(lines):
            wanted = offset >= skip and offset % parts == part
            data_name, data = _next_member(tar, wanted)
            meta_name, meta = _next_member(tar, wanted)
            if not wanted:
                continue
            d = decode_json_line(line)
            cid = d["id"]
            if data_name.rpartition(".")[0] != cid or meta_name.rpartition(".")[0] != cid:
                raise AssertionError(f"cut {cid!r} of the cuts manifest meets {data_name!r} in the tar")
            d["custom"] = dict(d.get("custom") or {}, shar_audio=origin)  # names the tar in errors (cut_path)
            if meta_name.endswith(".nometa"):  # lhotse's placeholder for a cut without audio
                yield offset, deserialize_item(d)
                continue
            d["recording"] = decode_json_line(meta.decode("utf-8"))
            yield offset, _cut_with_audio(d, data)


_PLAIN_CUT = frozenset(("id", "start", "duration", "channel", "supervisions", "recording", "custom", "type"))
_PLAIN_RECORDING = frozenset(("id", "sources", "sampling_rate", "num_samples", "duration", "channel_ids"))
_PLAIN_SUPERVISION = frozenset(("id", "recording_id", "start", "duration", "channel", "text", "language", "speaker",
                                "gender", "custom"))


def _plain_custom(custom) -> bool:
    """No nested dicts (which lhotse would try to read as manifests)."""
    return custom is None or not any(isinstance(v, dict) for v in custom.values())


def _cut_with_audio(d: dict, audio: bytes):
    """The cut of manifest dict ``d`` with its recording's source the ``audio`` bytes. A plain mono cut
    (one audio source, supervisions without alignments, no features, flat custom fields: what ``data
    shard`` writes) is built directly, in a third of ``MonoCut.from_dict``'s time; any other through
    lhotse."""
    rec, sups = d["recording"], d.get("supervisions") or []
    source = rec["sources"][0] if len(rec["sources"]) == 1 else {}
    if (d.get("type", "MonoCut") == "MonoCut" and d.keys() <= _PLAIN_CUT and rec.keys() <= _PLAIN_RECORDING
            and source.keys() <= {"type", "channels", "source"} and "channels" in source
            and _plain_custom(d["custom"])
            and all(s.keys() <= _PLAIN_SUPERVISION and _plain_custom(s.get("custom")) for s in sups)):
        recording = Recording(id=rec["id"], sources=[AudioSource(type="memory", channels=source["channels"], source=audio)],
                              sampling_rate=rec["sampling_rate"], num_samples=rec["num_samples"],
                              duration=rec["duration"], channel_ids=rec.get("channel_ids"))
        return MonoCut(id=d["id"], start=d["start"], duration=d["duration"], channel=d["channel"], recording=recording,
                       supervisions=[SupervisionSegment(**s) for s in sups], custom=d["custom"])
    cut = deserialize_item(d)
    source = cut.recording.sources[0]
    source.type, source.source = "memory", audio
    return cut


def _next_member(tar: TarStream, data: bool) -> tuple[str, bytes | None]:
    member = tar.next(data)
    if member is None:
        raise tarfile.ReadError("the tar ends before its cuts manifest does")
    return member


class _Prepended:
    """A byte stream's ``read`` with ``head`` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + self.f.read(n - len(out))

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


def _open_tar(location: str):
    """The bytes of a shard's tar (a file, URL or ``pipe:`` command), decompressed when it is a
    gzip, bzip2 or xz stream (lhotse reads tars with ``r|*``, so may we)."""
    import bz2
    import lzma

    f = open_best(location, "rb")
    head = f.read(6)
    kind = next((k for magic, k in _COMPRESSED if head.startswith(magic)), None)
    stream = _Prepended(head, f)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=stream)
    if kind is not None:
        return (bz2.BZ2File if kind == "bz2" else lzma.LZMAFile)(stream)
    return stream


class TarStream:
    """The regular files of an uncompressed tar byte stream, one after the other (ustar, GNU and pax
    headers, as :mod:`tarfile` and lhotse write them), read sequentially with ``read`` alone, so
    that pipes and object storage streams work. :mod:`tarfile` spends about 50 us of Python per
    member on its headers; this reads just the name, size and type (the names are then checked
    against the cuts manifest, which a damaged header or size fails). A stream that ends inside a
    member, or a header that is not one, is a ``tarfile.ReadError``."""

    def __init__(self, f):
        self.read = f.read

    def _payload(self, size: int, keep: bool = True) -> bytes | None:
        padded = size + (-size) % 512
        b = self.read(padded)
        if len(b) != padded:
            raise tarfile.ReadError("unexpected end of data")
        return b[:size] if keep else None

    def next(self, data: bool = True) -> tuple[str, bytes | None] | None:
        """(name, bytes) of the next regular file (bytes None when ``data`` is false), or None at the
        end of the archive."""
        pax: dict[str, str] = {}
        long_name = None
        while True:
            h = self.read(512)
            if not h or (h[0] == 0 and h.count(0) == 512):
                return None  # the end of the stream, or the archive's end-of-archive blocks
            if len(h) != 512:
                raise tarfile.ReadError("unexpected end of data")
            try:
                size, kind = _number(h[124:136]), h[156:157]
            except ValueError:
                raise tarfile.ReadError("not a tar header") from None
            if kind in (b"x", b"g", b"L", b"K"):  # pax / GNU extended headers: they describe the next member
                payload = self._payload(size)
                if kind == b"x":
                    pax = _pax_records(payload)
                elif kind == b"L":
                    long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            size = int(pax.get("size", size))
            if kind not in (b"0", b"\0", b"7"):  # directories, links, devices: no data to read
                self._payload(size, keep=False)
                pax, long_name = {}, None
                continue
            name = pax.get("path") or long_name or _ustar_name(h)
            return name, self._payload(size, keep=data)


def _number(field: bytes) -> int:
    """A tar header number: octal text, or GNU base-256 (first byte with its high bit set)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b" \0")
    return int(digits, 8) if digits else 0


def _ustar_name(h: bytes) -> str:
    name = h[:100].split(b"\0", 1)[0]
    if h[257:262] == b"ustar" and h[345] != 0:
        name = h[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(payload: bytes) -> dict[str, str]:
    """A pax extended header's ``LENGTH KEY=VALUE\\n`` records."""
    out, pos = {}, 0
    while pos < len(payload) and payload[pos] != 0:
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        key, _, value = payload[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


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
        if info is not None:
            # a loader worker: what it inherited from the training process (torch, the model, ...)
            # lives as long as it does; frozen, the collector stops rescanning all of it each time
            # the streamed cuts fill its oldest generation (3-6% of the worker's CPU on 0.5 s cuts).
            # The worker process is the stream's alone; the training process is left as it is.
            gc.freeze()
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
