"""Data sources -> lhotse CutSets (batches are :mod:`svqmae.data.loader`).

A *source* is any of: a folder of audio (searched recursively), a TSV/CSV manifest with a ``path``
column (relative to the manifest's folder; optional ``label``, ``text``, ``speaker``, ``seconds``,
``start``/``end``), a lhotse CutSet manifest, or a lhotse recordings manifest with its supervisions
manifest beside it (``*.jsonl.gz`` / ``*.jsonl``). Label, text and speaker travel on the cut's first
supervision (the label in ``supervision.custom["label"]``).

Loading is lenient for pre-training (bad files are skipped, counted and reported: see
:class:`Problems`) and strict for evaluation sets (the first bad file is an error naming it).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet, load_manifest
from lhotse.audio import AudioSource

from .audio import AUDIO_EXTENSIONS, AudioError, AudioInfo, audio_info, check_audio, probe, read_audio, resample


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


def _parallel(fn, items, workers: int = 8):
    """``map`` over threads (libsndfile releases the GIL), results in input order."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _probe_all(items: list[tuple[str, Path]], problems: Problems) -> dict[str, Recording]:
    """(recording id, path) pairs -> {id: Recording}; unreadable files go to ``problems``."""

    def probe(item):
        try:
            return item[0], _recording(*item), None
        except AudioError as e:
            return item[0], None, str(e)

    out: dict[str, Recording] = {}
    paths = dict(items)
    for rid, rec, err in _parallel(probe, items):
        if rec is None:
            problems.add(str(paths[rid]), err)
        else:
            out[rid] = rec
    return out


def scan_folder(folder: Path, problems: Problems) -> CutSet:
    """Every audio file under ``folder`` (recursively), one cut per file."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    recs = _probe_all([(str(p.relative_to(folder).with_suffix("")), p) for p in files], problems)
    return CutSet.from_cuts(rec.to_cut() for rec in recs.values())  # cut id = path without extension


def _seconds(row: dict, key: str, where: str) -> float | None:
    v = (row.get(key) or "").strip()
    if not v:
        return None
    try:
        x = float(v)
    except ValueError:
        raise DataError(f"{where}: '{key}' is not a number ({v!r})") from None
    if not math.isfinite(x) or x < 0:
        raise DataError(f"{where}: '{key}' must be a finite number >= 0 (got {v})")
    return x


def read_manifest(path: Path, problems: Problems) -> CutSet:
    """TSV or CSV with a header holding at least ``path`` (relative to the manifest's folder, or
    absolute); optional ``label``, ``text``, ``speaker`` and ``start``/``end`` (seconds, for a
    segment of the file). Each file is probed once however many segments it has."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: empty manifest")
    lines = text.splitlines()
    delim = "\t" if "\t" in lines[0] else ","
    reader = csv.DictReader(lines, delimiter=delim)
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "path" not in header:
        raise DataError(f"{path}: manifest has no 'path' column (columns: {', '.join(header)})")
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    if not rows:
        raise DataError(f"{path}: manifest has a header but no rows")
    root = path.parent
    rels: dict[str, Path] = {}
    for i, row in enumerate(rows):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise DataError(f"{path}: row {i + 2} has an empty 'path'")
        rels.setdefault(rel, root / rel)
    recs = _probe_all(list(rels.items()), problems)
    cuts, used = [], set()
    for i, row in enumerate(rows):
        rel = row["path"].strip()
        rec = recs.get(rel)
        if rec is None:
            continue  # reported once per file by the probe
        where = f"{path}: row {i + 2}"
        start = _seconds(row, "start", where) or 0.0
        end = _seconds(row, "end", where)
        end = rec.duration if end is None else min(end, rec.duration)
        if end - start <= 0:
            problems.add(str(rels[rel]), f"{where}: segment {start:g}-{end:g} s of {rels[rel]} is empty")
            continue
        cut_id = rel if rel not in used else f"{rel}#{i + 2}"
        used.add(cut_id)
        label = (row.get("label") or "").strip()
        sup = SupervisionSegment(
            id=cut_id,
            recording_id=rec.id,
            start=0.0,
            duration=end - start,
            text=(row.get("text") or "").strip() or None,
            speaker=(row.get("speaker") or "").strip() or None,
            custom={"label": label} if label else None,
        )
        cut = rec.to_cut().truncate(offset=start, duration=end - start, preserve_id=True)
        cut.id = cut_id
        cut.supervisions = [sup]
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def _sibling(path: Path, this: str, other: str) -> Path | None:
    """``x_recordings_y.jsonl.gz`` -> ``x_supervisions_y.jsonl.gz`` if that file exists."""
    if this not in path.name:
        return None
    p = path.with_name(path.name.replace(this, other))
    return p if p.is_file() else None


def read_lhotse(path: Path, problems: Problems) -> CutSet:
    """A lhotse CutSet, or a RecordingSet / SupervisionSet whose partner manifest lies next to it
    (``*recordings*`` <-> ``*supervisions*``). Cuts are trimmed to their supervisions; cuts whose
    audio file is missing go to ``problems``."""
    try:
        m = load_manifest(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable lhotse manifest ({_first_line(e)})") from None
    if isinstance(m, (RecordingSet, SupervisionSet)):
        rec_path = path if isinstance(m, RecordingSet) else _sibling(path, "supervisions", "recordings")
        sup_path = path if isinstance(m, SupervisionSet) else _sibling(path, "recordings", "supervisions")
        if rec_path is None:
            raise DataError(f"{path}: a supervision manifest needs its recordings manifest next to it "
                            f"(same name with 'recordings' for 'supervisions')")
        recs = m if rec_path == path else load_manifest(rec_path)
        sups = None if sup_path is None else (m if sup_path == path else load_manifest(sup_path))
        m = CutSet.from_manifests(recordings=recs, supervisions=sups)
        if sups is not None:
            m = m.trim_to_supervisions(keep_overlapping=False)
    if not isinstance(m, CutSet):
        raise DataError(f"{path}: a lhotse {type(m).__name__} holds no audio (give a CutSet or recordings)")
    cuts = []
    for cut in m.to_eager():
        if cut.has_recording and cut.recording.sources[0].type == "file":
            f = Path(cut.recording.sources[0].source)
            if not f.is_file():
                problems.add(str(f), f"{f}: file not found (listed in {path})")
                continue
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def load_source(src: str | Path, problems: Problems | None = None) -> CutSet:
    """Any supported source -> CutSet (eager).

    With ``problems`` (lenient, for pre-training) unreadable files are recorded there and left out;
    without it (strict, for evaluation sets) the first problem is a ``DataError`` naming the file."""
    p = Path(src)
    strict = problems is None
    problems = problems if problems is not None else Problems()
    if not p.exists():
        raise DataError(f"{p}: data source not found")
    if p.is_dir():
        cuts = scan_folder(p, problems)
    elif p.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        cuts = read_lhotse(p, problems)
    elif p.suffix.lower() in (".tsv", ".csv", ".txt"):
        cuts = read_manifest(p, problems)
    elif p.suffix.lower() in AUDIO_EXTENSIONS:
        cuts = CutSet.from_cuts(rec.to_cut() for rec in _probe_all([(p.stem, p)], problems).values())
    else:
        raise DataError(f"{p}: unknown source kind (a folder, a .tsv/.csv manifest or a lhotse .jsonl.gz)")
    if strict and len(problems):
        raise DataError(problems.items[0][1])
    if len(cuts) == 0:
        raise DataError(f"{p}: no usable audio")
    return cuts


def load_sources(srcs: list[str | Path], problems: Problems) -> CutSet:
    """Several sources as one CutSet; ids are prefixed by the source's position where two sources
    would otherwise share an id."""
    sets = [load_source(s, problems) for s in srcs]
    ids = [c.id for cs in sets for c in cs]
    if len(set(ids)) == len(ids):
        return CutSet.from_cuts(c for cs in sets for c in cs)
    return CutSet.from_cuts(c.with_id(f"{k}:{c.id}") for k, cs in enumerate(sets) for c in cs)


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else e.__class__.__name__)[:200]


# --------------------------------------------------------------------------- manifests

MANIFEST_COLUMNS = ("path", "seconds", "speaker", "label", "text", "start", "end")


def cut_fields(cut) -> dict:
    """A cut's ``label``, ``text`` and ``speaker`` (from its first supervision), '' where absent."""
    sup = cut.supervisions[0] if cut.supervisions else None
    custom = (sup.custom or {}) if sup is not None else {}
    return {
        "label": str(custom.get("label", "") or ""),
        "text": (sup.text or "") if sup is not None else "",
        "speaker": (sup.speaker or "") if sup is not None else "",
    }


def write_manifest(rows, path: str | Path) -> Path:
    """Rows (dicts; ``path`` absolute or relative to the manifest's folder) -> a TSV manifest with
    the columns of :data:`MANIFEST_COLUMNS` that any row fills, in that order."""
    path = Path(path)
    rows = list(rows)
    cols = [c for c in MANIFEST_COLUMNS if c == "path" or any(str(r.get(c, "") or "") for r in rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([" ".join(str(r.get(c, "") or "").split()) for c in cols])
    os.replace(tmp, path)
    return path


def cuts_to_rows(cuts, root: str | Path) -> list[dict]:
    """Manifest rows for ``cuts``, paths relative to ``root`` (the manifest's folder)."""
    rows = []
    for cut in cuts:
        r = {"path": os.path.relpath(Path(cut_path(cut)).resolve(), Path(root).resolve()),
             "seconds": f"{cut.duration:.3f}", **cut_fields(cut)}
        if cut.start > 0 or cut.duration < cut.recording.duration - 1e-3:
            r["start"], r["end"] = f"{cut.start:.3f}", f"{cut.end:.3f}"
        rows.append(r)
    return rows


# --------------------------------------------------------------------------- data check


@dataclass
class SourceReport:
    """What ``svqmae data check`` says about a source."""

    source: str
    durations: list[float]
    rates: Counter
    channels: Counter
    encodings: Counter
    labels: Counter
    speakers: set
    with_text: int
    problems: Problems
    min_seconds: float

    @property
    def count(self) -> int:
        return len(self.durations)

    @property
    def hours(self) -> float:
        return sum(self.durations) / 3600

    def summary(self) -> str:
        d = sorted(self.durations)
        lines = [f"{self.source}: {self.count} usable utterances, {self.hours:.3f} h"]
        if d:
            q = np.percentile(d, [50, 90])
            lines.append(f"  durations: min {d[0]:.2f} s, median {q[0]:.2f} s, 90% {q[1]:.2f} s, max {d[-1]:.2f} s; "
                         f"{sum(x < self.min_seconds for x in d)} shorter than {self.min_seconds:g} s "
                         f"(skipped by pre-training)")
        lines.append("  sample rates: " + _counts(self.rates, " Hz"))
        lines.append("  channels: " + _counts(self.channels, ""))
        lines.append("  encodings: " + _counts(self.encodings, ""))
        lines.append(f"  speakers: {len(self.speakers)}; with text: {self.with_text}; "
                     f"labels: {len(self.labels)}" + (f" ({_counts(self.labels, '')})" if self.labels else ""))
        lines.append(f"  problem files: {len(self.problems)}")
        lines += [f"    {reason}" for _, reason in self.problems.items]
        return "\n".join(lines)


def _counts(c: Counter, unit: str) -> str:
    return ", ".join(f"{k}{unit} x{n}" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "-"


def check_source(src: str | Path, decode: bool = True, min_seconds: float = 0.5, workers: int = 8) -> SourceReport:
    """Scan a source leniently; with ``decode`` every file is decoded in full, so truncated files
    and NaN samples are found too (not only unreadable headers)."""
    problems = Problems()
    try:
        cuts = load_source(src, problems)
    except DataError:
        if not len(problems):
            raise
        cuts = CutSet.from_cuts([])  # every file was a problem: report them
    infos: dict[str, AudioInfo | None] = {}

    def look(path: str):
        try:
            return path, (check_audio(path) if decode else probe(path)), None
        except AudioError as e:
            return path, None, str(e)

    for path, info, err in _parallel(look, sorted({cut_path(c) for c in cuts}), workers):
        infos[path] = info
        if err:
            problems.add(path, err)
    rep = SourceReport(str(src), [], Counter(), Counter(), Counter(), Counter(), set(), 0, problems, min_seconds)
    for cut in cuts:
        info = infos.get(cut_path(cut))
        if info is None:
            continue
        f = cut_fields(cut)
        rep.durations.append(cut.duration)
        rep.rates[info.sample_rate] += 1
        rep.channels[info.channels] += 1
        rep.encodings[f"{info.format} {info.subtype}"] += 1
        if f["label"]:
            rep.labels[f["label"]] += 1
        if f["speaker"]:
            rep.speakers.add(f["speaker"])
        rep.with_text += bool(f["text"])
    return rep


# --------------------------------------------------------------------------- batching


def cut_path(cut) -> str:
    return cut.recording.sources[0].source


def read_span(cut, offset: float, duration: float, sample_rate: int = 16000) -> np.ndarray:
    """``duration`` seconds of ``cut``'s recording from ``offset``, mono float32 at ``sample_rate``.
    Files are read directly (fast path); other lhotse sources (URLs, commands, memory) via lhotse."""
    src = cut.recording.sources[0]
    if src.type == "file":
        return read_audio(src.source, sample_rate, offset=offset, duration=duration)
    try:
        x = cut.recording.load_audio(offset=offset, duration=duration)
    except Exception as e:
        raise AudioError(f"{src.source}: unreadable audio ({_first_line(e)})") from None
    x = np.asarray(x, dtype=np.float32).mean(axis=0)
    if x.size == 0 or not np.isfinite(x).all():
        raise AudioError(f"{src.source}: {'empty audio' if x.size == 0 else 'audio contains NaN or Inf samples'}")
    return resample(x, cut.recording.sampling_rate, sample_rate)


def load_cut(cut, sample_rate: int = 16000) -> np.ndarray:
    """The whole cut, mono float32 at ``sample_rate``; a bad file is an ``AudioError`` naming it."""
    return read_span(cut, cut.start, cut.duration, sample_rate)


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
