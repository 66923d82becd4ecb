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
import logging
import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from lhotse import CutSet, MonoCut, Recording, RecordingSet, SupervisionSegment, SupervisionSet, load_manifest
from lhotse.audio import AudioSource
from lhotse.cut import Cut
from lhotse.lazy import LazyIteratorChain
from lhotse.utils import compute_num_samples

from ..config import private_tmp
from .audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    AudioInfo,
    audio_info,
    check_audio,
    probe,
    read_audio,
    read_audio_bytes,
    resample,
)
from .common import DataError, Problems, cut_fields, cut_path, stable_hash  # noqa: F401 (re-exported)
from .shar import SAMPLE_RATE, SHARD_ERRORS, is_shar, iter_shard, open_shar, read_shar, shard_error

log = logging.getLogger(__name__)

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


def scan_folder(folder: Path, problems: Problems, cache: Path | None = None) -> CutSet:
    """Every audio file under ``folder`` (recursively), one cut per file (id = path without extension).

    With ``cache`` (a folder, e.g. the run's ``data_cache/``) the probe is done once: its cuts and
    problems are kept there and reused while the folder holds the same files, so a resumed run does
    not probe again (a file that changed since is found when it is read, and skipped as usual)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no audio files found (looked for {', '.join(AUDIO_EXTENSIONS)})")
    if cache is not None:
        cached = _read_probe_cache(folder, files, cache, problems)
        if cached is not None:
            return cached
    mine = Problems()
    recs = _probe_all(list(zip(_file_ids(folder, files), files)), mine)
    cuts = CutSet.from_cuts(rec.to_cut() for rec in recs.values())
    if cache is not None:
        _write_probe_cache(folder, cuts, mine, cache)
    for path, reason in mine.items:
        problems.add(path, reason)
    return cuts


def _file_ids(folder: Path, files: list[Path]) -> list[str]:
    """Cut ids of a folder's files: the path relative to the folder without its extension, or with it
    where two files would share an id (``a.wav`` and ``a.flac``: both kept, as ``a.wav`` and ``a.flac``)."""
    stems = [str(p.relative_to(folder).with_suffix("")) for p in files]
    count = Counter(stems)
    return [s if count[s] == 1 else str(p.relative_to(folder)) for s, p in zip(stems, files)]


def _probe_cache_paths(folder: Path, cache: Path) -> tuple[Path, Path]:
    key = f"{folder.resolve().name}-{stable_hash(str(folder.resolve())):016x}"
    return cache / f"probe-{key}.jsonl.gz", cache / f"probe-{key}.problems.tsv"


def _read_probe_cache(folder: Path, files: list[Path], cache: Path, problems: Problems) -> CutSet | None:
    """The cached probe of ``folder`` if it covers exactly ``files``, else None."""
    cuts_file, problems_file = _probe_cache_paths(folder, cache)
    if not (cuts_file.is_file() and problems_file.is_file()):
        return None
    try:
        cuts = CutSet.from_file(cuts_file).to_eager()
        rows = [line.split("\t", 1) for line in problems_file.read_text(encoding="utf-8").splitlines()[1:]]
    except Exception:  # unreadable cache: probe again
        return None
    if sorted([cut_path(c) for c in cuts] + [r[0] for r in rows]) != [str(p) for p in files]:
        return None
    for path, reason in rows:
        problems.add(path, reason)
    return cuts


def _write_probe_cache(folder: Path, cuts: CutSet, problems: Problems, cache: Path) -> None:
    """Best effort: a cache that cannot be written only costs a probe next time. Several processes
    (DDP ranks, loader workers) may write the same entry at once, so each writes its own temporary
    file and renames it into place."""
    cuts_file, problems_file = _probe_cache_paths(folder, cache)
    text = "path\treason\n" + "".join(f"{p}\t{' '.join(r.split())}\n" for p, r in problems.items)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = private_tmp(cuts_file, ".jsonl.gz")
        cuts.to_file(tmp)
        os.replace(tmp, cuts_file)
        tmp = private_tmp(problems_file, ".tsv")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, problems_file)
    except OSError as e:
        log.warning("could not write the probe cache %s (%s); the folder will be probed again next time",
                    cuts_file, e)


def _seconds(row: dict, key: str, where: str) -> float | None:
    v = (row.get(key) or "").strip()
    if not v:
        return None
    try:
        x = float(v)
    except ValueError:
        raise DataError(f"{where}: '{key}' is not a number ({v!r})") from None
    if not math.isfinite(x) or x < 0 or x >= MAX_SECONDS:
        raise DataError(f"{where}: '{key}' must be a number of seconds >= 0 and < {MAX_SECONDS:,.0f} (got {v})")
    return x


MAX_SECONDS = 1e7  # a manifest's times: 115 days is no recording (and lhotse's sample arithmetic overflows later)


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); save the "
                     f"manifest as UTF-8")


# manifests larger than this (gzip: counted 8x) are read lazily in lenient mode: never whole in memory
LAZY_MANIFEST_BYTES = 8 << 20


def _large(path: Path) -> bool:
    return path.stat().st_size * (8 if path.name.endswith(".gz") else 1) > LAZY_MANIFEST_BYTES


def _manifest_header(path: Path, first_line: str) -> tuple[str, list[str]]:
    """(delimiter, stripped column names) of a TSV/CSV manifest; DataError if it has no ``path``."""
    delim = "\t" if "\t" in first_line else ","
    header = [h.strip() for h in next(csv.reader([first_line], delimiter=delim))]
    if "path" not in header:
        raise DataError(f"{path}: manifest has no 'path' column (columns: {', '.join(header)})")
    return delim, header


def _row_path(row: dict, i: int, path: Path) -> str:
    rel = (row.get("path") or "").strip()
    if not rel:
        raise DataError(f"{path}: row {i + 2} has an empty 'path'")
    return rel


def _row_segment(row: dict, where: str, known: float | None) -> tuple[float, float]:
    """(start, end) seconds of a row: ``start`` (default 0); ``end``, else start + ``seconds``, else
    the file's probed duration ``known`` (None: not probed, then the row must give one of them)."""
    start = _seconds(row, "start", where) or 0.0
    end = _seconds(row, "end", where)
    if end is None:
        secs = _seconds(row, "seconds", where) if known is None else None
        if secs is None and known is None:
            raise DataError(f"{where}: empty 'seconds' (fill it in, or drop the column to have every file probed)")
        end = start + secs if secs is not None else known
    return start, (end if known is None else min(end, known))


def length_tolerance(seconds: float) -> float:
    """How far a file's decoded length may fall short of what its manifest says: rounding of the
    ``seconds`` column and resampling, never a lost part (0.1 s, or 1% of long files)."""
    return max(0.1, 0.01 * seconds)


def _length_lie(row: dict, where: str, known: float) -> str | None:
    """What is wrong when a row's ``seconds`` (whole file) or ``end`` lies past the probed length
    ``known`` of its file (a truncated file, or a wrong manifest), else None."""
    end = _seconds(row, "end", where)
    secs = _seconds(row, "seconds", where) if end is None and not (row.get("start") or "").strip() else None
    said = end if end is not None else secs
    if said is not None and said - known > length_tolerance(said):
        what = f"'end' is {said:g} s" if end is not None else f"'seconds' is {said:g}"
        return f"holds {known:.2f} s of audio but the manifest's {what} (a truncated file, or a wrong manifest)"
    return None


def _row_cut(row: dict, rel: str, cut_id: str, rec: Recording, start: float, end: float):
    """A manifest row -> a cut of ``rec`` from ``start`` to ``end`` carrying label, text and speaker."""
    label = (row.get("label") or "").strip()
    sup = SupervisionSegment(
        id=cut_id, recording_id=rec.id, start=0.0, duration=end - start,
        text=(row.get("text") or "").strip() or None, speaker=(row.get("speaker") or "").strip() or None,
        custom={"label": label} if label else None,
    )
    return MonoCut(id=cut_id, start=start, duration=end - start, channel=0, recording=rec, supervisions=[sup])


def _unprobed_recording(rel: str, path: Path, end: float) -> Recording:
    """A file's recording as the manifest describes it, without opening it. The rate is nominal
    (16 kHz): svqmae reads files itself (:func:`read_span`), at their real rate, and resamples."""
    return Recording(id=rel, sources=[AudioSource(type="file", channels=[0], source=str(path))],
                     sampling_rate=16000, num_samples=compute_num_samples(end, 16000), duration=end)


class LazyManifestCuts:
    """The cuts of a TSV/CSV manifest with a ``seconds`` column, read row by row on every pass (for
    ``CutSet(...)``: lazy, never whole in memory, no file opened until its audio is read; a row whose
    ``seconds`` cell is empty has its file probed, and an unreadable one goes to ``problems``)."""

    def __init__(self, path: Path, problems: Problems | None = None):
        self.path, self.problems = path, problems if problems is not None else Problems()
        self.reported = False  # repeated rows: dropped on every pass, reported after the first whole one

    def _probed(self, rel: str, where: str) -> Recording | None:
        try:
            return _recording(rel, self.path.parent / rel)
        except AudioError as e:
            self.problems.add(str(self.path.parent / rel), f"{where}: {e}")
            return None

    def __iter__(self):
        try:
            yield from first_of_each(self._rows(), str(self.path), self.problems, report=not self.reported)
        except UnicodeDecodeError as e:
            raise _not_utf8(self.path, e) from None
        self.reported = True

    def _rows(self):
        with open(self.path, encoding="utf-8-sig", newline="") as f:
            delim, header = _manifest_header(self.path, f.readline())
            used: set[str] = set()
            for i, values in enumerate(csv.reader(f, delimiter=delim)):
                if not any(v.strip() for v in values):
                    continue
                row = dict(zip(header, values))
                rel = _row_path(row, i, self.path)
                where = f"{self.path}: row {i + 2}"
                rec = None
                if not (row.get("seconds") or "").strip() and not (row.get("end") or "").strip():
                    rec = self._probed(rel, where)  # an empty cell: the file says how long it is
                    if rec is None:
                        continue
                start, end = _row_segment(row, where, None if rec is None else rec.duration)
                if end - start <= 0:
                    self.problems.add(str(self.path.parent / rel), f"{where}: segment {start:g}-{end:g} s of "
                                                                   f"{self.path.parent / rel} is empty")
                    continue
                cut_id = rel if rel not in used else f"{rel}#{i + 2}"
                used.add(cut_id)
                rec = rec or _unprobed_recording(rel, self.path.parent / rel, end)
                yield _row_cut(row, rel, cut_id, rec, start, end)

    def __len__(self) -> int:
        with open(self.path, "rb") as f:
            return max(sum(1 for line in f if line.strip()) - 1, 0)


def read_manifest(path: Path, problems: Problems, probe_files: bool = True) -> CutSet:
    """TSV or CSV with a header holding at least ``path`` (relative to the manifest's folder, or
    absolute); optional ``label``, ``text``, ``speaker``, ``seconds`` and ``start``/``end`` (seconds,
    for a segment of the file). Each file is probed once however many segments it has; with
    ``probe_files=False`` and a ``seconds`` column no file is opened here (a bad one is found when
    it is read), and a manifest over ``LAZY_MANIFEST_BYTES`` is read lazily."""
    text = path.read_text(encoding="utf-8-sig") if probe_files or not _large(path) else None
    if text is None:  # a large manifest: only its header is read here
        with open(path, encoding="utf-8-sig") as f:
            _, header = _manifest_header(path, f.readline())
        if "seconds" in header:
            return CutSet(LazyManifestCuts(path, problems))
        text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: empty manifest")
    lines = text.splitlines()
    delim, header = _manifest_header(path, lines[0])
    reader = csv.DictReader(lines, delimiter=delim)
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    if not rows:
        raise DataError(f"{path}: manifest has a header but no rows")
    root = path.parent
    rels = {_row_path(row, i, path): None for i, row in enumerate(rows)}
    if not probe_files and "seconds" in header:
        return CutSet.from_cuts(LazyManifestCuts(path, problems))
    recs = _probe_all([(rel, root / rel) for rel in rels], problems)
    cuts, used = [], set()
    for i, row in enumerate(rows):
        rel = row["path"].strip()
        rec = recs.get(rel)
        if rec is None:
            continue  # reported once per file by the probe
        where = f"{path}: row {i + 2}"
        lie = _length_lie(row, where, rec.duration)
        if lie:
            problems.add(str(root / rel), f"{where}: {root / rel} {lie}")
            continue
        start, end = _row_segment(row, where, rec.duration)
        if end - start <= 0:
            problems.add(str(root / rel), f"{where}: segment {start:g}-{end:g} s of {root / rel} is empty")
            continue
        cut_id = rel if rel not in used else f"{rel}#{i + 2}"
        used.add(cut_id)
        cut = rec.to_cut().truncate(offset=start, duration=end - start, preserve_id=True)
        cut.id = cut_id
        cut.supervisions = _row_cut(row, rel, cut_id, rec, start, end).supervisions
        cuts.append(cut)
    return CutSet.from_cuts(cuts)


def _sibling(path: Path, this: str, other: str) -> Path | None:
    """``x_recordings_y.jsonl.gz`` -> ``x_supervisions_y.jsonl.gz`` if that file exists."""
    if this not in path.name:
        return None
    p = path.with_name(path.name.replace(this, other))
    return p if p.is_file() else None


def read_lhotse(path: Path, problems: Problems, lazy: bool = False) -> CutSet:
    """A lhotse CutSet, or a RecordingSet / SupervisionSet whose partner manifest lies next to it
    (``*recordings*`` <-> ``*supervisions*``). Cuts are trimmed to their supervisions; cuts whose
    audio file is missing go to ``problems``. With ``lazy``, a CutSet manifest over
    ``LAZY_MANIFEST_BYTES`` is opened lazily (read cut by cut on every pass; a missing file is found
    when it is read)."""
    if lazy and _large(path) and path.name.endswith((".jsonl", ".jsonl.gz")):
        try:
            first = next(iter(CutSet.from_jsonl_lazy(path)))
        except Exception as e:
            first = e
        if isinstance(first, Cut):
            return CutSet.from_jsonl_lazy(path)
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


def load_source(src: str | Path, problems: Problems | None = None, cache: Path | None = None) -> CutSet:
    """Any supported source -> CutSet.

    With ``problems`` (lenient, for training) unreadable files are recorded there and left out, a
    manifest with a ``seconds`` column is not probed, and a large manifest is read lazily; without it
    (strict, for evaluation sets) every file is probed and the first problem is a ``DataError``
    naming the file. ``cache``: where a folder's probe is kept (see :func:`scan_folder`). A Shar
    directory is read whole here (its audio in memory): training streams it instead
    (:mod:`svqmae.data.shar`)."""
    p = Path(src)
    strict = problems is None
    problems = problems if problems is not None else Problems()
    known = len(problems)
    if is_shar(src):
        cuts = read_shar(src, problems)
    elif not p.exists():
        raise DataError(f"{p}: data source not found")
    elif p.is_dir():
        cuts = scan_folder(p, problems, cache)
    elif p.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        cuts = read_lhotse(p, problems, lazy=not strict)
    elif p.suffix.lower() in (".tsv", ".csv", ".txt"):
        try:
            cuts = read_manifest(p, problems, probe_files=strict)
        except UnicodeDecodeError as e:
            raise _not_utf8(p, e) from None
    elif p.suffix.lower() in AUDIO_EXTENSIONS:
        cuts = CutSet.from_cuts(rec.to_cut() for rec in _probe_all([(p.stem, p)], problems).values())
    else:
        raise DataError(f"{p}: unknown source kind (a folder, a Shar directory, a .tsv/.csv manifest or a "
                        f"lhotse .jsonl.gz)")
    if strict and len(problems):
        raise DataError(problems.items[0][1])
    if not cuts.is_lazy and len(cuts) == 0:
        mine = problems.items[known:]
        why = f" ({len(mine)} unreadable file(s), e.g. {mine[0][1]})" if mine else ""
        raise NoUsableAudio(f"{p}: no usable audio{why}")
    return cuts if cuts.is_lazy else drop_repeats(cuts, str(p), problems)


class NoUsableAudio(DataError):
    """A source read whole in which no file could be used (the files' problems are recorded)."""


def _audio_key(cut) -> tuple[str, float, float]:
    """What a cut plays: its file (or Shar member) and segment."""
    return os.path.normpath(os.path.abspath(cut_path(cut))), round(cut.start, 3), round(cut.duration, 3)


def first_of_each(cuts, where: str, problems: Problems, report: bool = True):
    """The cuts of ``cuts`` whose audio (file or Shar member, and segment) was not met before: a
    repeated path or segment would count twice in training and in an evaluation's figures. Once the
    cuts are exhausted, the repeats are recorded in ``problems.repeated`` and warned about in one line
    (with ``report``); evaluation and training do the same."""
    seen: dict[tuple, int] = {}
    for cut in cuts:
        key = _audio_key(cut)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 1:
            yield cut
    repeats = [(k, n) for k, n in seen.items() if n > 1]
    if not repeats or not report:
        return
    for (path, start, dur), n in repeats:
        what = path if start == 0 else f"{path} ({start:g}-{start + dur:g} s)"
        problems.repeated.append((path, f"{what}: listed {n} times in {where}; used once"))
    (path, _, _), n = repeats[0]
    log.warning("%s: %d repeated item(s) dropped, each used once (e.g. %s, listed %d times)",
                where, sum(n - 1 for _, n in repeats), path, n)


def drop_repeats(cuts: CutSet, where: str, problems: Problems) -> CutSet:
    """``cuts`` with each piece of audio once (see :func:`first_of_each`)."""
    keep = list(first_of_each(cuts, where, problems))
    return cuts if len(keep) == len(cuts) else CutSet.from_cuts(keep)


def load_sources(srcs: list[str | Path], problems: Problems, cache: Path | None = None) -> CutSet:
    """Several sources as one CutSet (lazy if any of them is); ids are prefixed by the source's
    position where two sources would otherwise share an id (lazy sources: always, if several)."""
    sets = [load_source(s, problems, cache) for s in srcs]
    if len(sets) == 1:
        return sets[0]
    if any(cs.is_lazy for cs in sets):
        return CutSet(LazyIteratorChain(*[cs.map(partial(_prefixed, k)) for k, cs in enumerate(sets)]))
    ids = [c.id for cs in sets for c in cs]
    if len(set(ids)) == len(ids):
        cuts = CutSet.from_cuts(c for cs in sets for c in cs)
    else:
        cuts = CutSet.from_cuts(c.with_id(f"{k}:{c.id}") for k, cs in enumerate(sets) for c in cs)
    return drop_repeats(cuts, " and ".join(map(str, srcs)), problems)


def _prefixed(k: int, cut):
    return cut.with_id(f"{k}:{cut.id}")


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else e.__class__.__name__)[:200]


# --------------------------------------------------------------------------- manifests

MANIFEST_COLUMNS = ("path", "seconds", "speaker", "label", "text", "start", "end")


def write_manifest(rows, path: str | Path) -> Path:
    """Rows (dicts; ``path`` absolute or relative to the manifest's folder) -> a TSV manifest with
    the columns of :data:`MANIFEST_COLUMNS` that any row fills, in that order."""
    path = Path(path)
    rows = list(rows)
    cols = [c for c in MANIFEST_COLUMNS if c == "path" or any(str(r.get(c, "") or "") for r in rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path, ".tsv")
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
    shards: int | None = None  # a Shar source's shard count

    @property
    def count(self) -> int:
        return len(self.durations)

    @property
    def hours(self) -> float:
        return sum(self.durations) / 3600

    def summary(self) -> str:
        d = sorted(self.durations)
        lines = [f"{self.source}: {self.count} usable utterances, {self.hours:.3f} h"
                 + (f" in {self.shards} Shar shards" if self.shards is not None else "")]
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
        if self.problems.repeated:
            lines.append(f"  repeated items (counted once, used once by training and evaluation): "
                         f"{len(self.problems.repeated)}")
            lines += [f"    {message}" for _, message in self.problems.repeated]
        return "\n".join(lines)


def _counts(c: Counter, unit: str) -> str:
    return ", ".join(f"{k}{unit} x{n}" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "-"


def _encoding(data: bytes) -> str:
    return {b"fLaC": "FLAC in Shar", b"OggS": "OGG in Shar", b"RIFF": "WAV in Shar"}.get(data[:4], "other in Shar")


def check_shar(src, decode: bool = True, min_seconds: float = 0.5):
    """``svqmae data check`` of a Shar source: every shard read to its end (with ``decode`` every
    audio member decoded too), the cut count checked against the index. -> SourceReport."""
    shar = open_shar(src)
    problems = Problems()
    rep = SourceReport(str(src), [], Counter(), Counter(), Counter(), Counter(), set(), 0, problems, min_seconds)
    rep.shards = len(shar.shards)
    for shard, expected in zip(shar.shards, shar.counts):
        n = 0
        try:
            for _, cut in iter_shard(shard):
                n += 1
                if decode:
                    try:
                        read_audio_bytes(cut.recording.sources[0].source, cut_path(cut), SAMPLE_RATE)
                    except AudioError as e:
                        problems.add(cut_path(cut), str(e))
                        continue
                f = cut_fields(cut)
                rep.durations.append(cut.duration)
                rep.rates[cut.sampling_rate] += 1
                rep.channels[len(cut.recording.channel_ids)] += 1
                rep.encodings[_encoding(cut.recording.sources[0].source)] += 1
                if f["label"]:
                    rep.labels[f["label"]] += 1
                if f["speaker"]:
                    rep.speakers.add(f["speaker"])
                rep.with_text += bool(f["text"])
        except SHARD_ERRORS as e:
            problems.add(*shard_error(shard, e))
            continue
        if expected is not None and n != expected:
            problems.add(shard["recording"], f"{shard['recording']}: {n} cuts, the index says {expected}")
    return rep


def check_source(src: str | Path, decode: bool = True, min_seconds: float = 0.5, workers: int = 8) -> SourceReport:
    """Scan a source leniently; with ``decode`` every file is decoded in full, so truncated files
    and NaN samples are found too (not only unreadable headers)."""
    if is_shar(src):
        return check_shar(src, decode, min_seconds)
    problems = Problems()
    try:
        cuts = load_source(src, problems)
    except NoUsableAudio:
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
        if cut.end - info.duration > length_tolerance(cut.end):  # a manifest's length, never checked before
            problems.add(cut_path(cut), f"{cut_path(cut)}: holds {info.duration:.2f} s of audio but its manifest "
                                        f"says {cut.end:.2f} s (a truncated file, or a wrong manifest)")
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


def read_span(cut, offset: float, duration: float, sample_rate: int = 16000) -> np.ndarray:
    """``duration`` seconds of ``cut``'s recording from ``offset``, mono float32 at ``sample_rate``.
    Files and Shar audio are decoded directly (fast path); other lhotse sources (URLs, commands)
    via lhotse."""
    src = cut.recording.sources[0]
    if src.type == "file":
        return _whole(read_audio(src.source, sample_rate, offset=offset, duration=duration), src.source,
                      offset, duration, sample_rate)
    if src.type == "memory" and isinstance(src.source, bytes):
        x = read_audio_bytes(src.source, cut_path(cut), sample_rate, offset=offset, duration=duration)
        return _whole(x, cut_path(cut), offset, duration, sample_rate)
    try:
        x = cut.recording.load_audio(offset=offset, duration=duration)
    except Exception as e:
        raise AudioError(f"{src.source}: unreadable audio ({_first_line(e)})") from None
    x = np.asarray(x, dtype=np.float32).mean(axis=0)
    if x.size == 0 or not np.isfinite(x).all():
        raise AudioError(f"{src.source}: {'empty audio' if x.size == 0 else 'audio contains NaN or Inf samples'}")
    return resample(x, cut.recording.sampling_rate, sample_rate)


def _whole(x: np.ndarray, name: str, offset: float, duration: float, sample_rate: int) -> np.ndarray:
    """``x`` if it is as long as its manifest says (see :func:`length_tolerance`); else an ``AudioError``:
    a manifest that gives the length (``seconds``) is not checked against the file before it is read."""
    got = len(x) / sample_rate
    if duration - got > length_tolerance(duration):
        raise AudioError(f"{name}: truncated audio or a wrong length in its manifest (decoded {got:.2f} s from "
                         f"{offset:g} s, the manifest says {duration:.2f} s)")
    return x


def load_cut(cut, sample_rate: int = 16000) -> np.ndarray:
    """The whole cut, mono float32 at ``sample_rate``; a bad file is an ``AudioError`` naming it."""
    return read_span(cut, cut.start, cut.duration, sample_rate)


