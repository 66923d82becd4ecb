"""``svqmae data shard``: sources -> a lhotse Shar directory (layout: :mod:`svqmae.data.shar`).

The cuts are put in a seeded random order (so that every shard, and the head of the directory, is a
random sample) and cut into shards of about ``shard_seconds`` of audio: a plan that is a pure
function of the sources and settings, so that a rerun after an interruption writes exactly the
shards still missing. Each shard is written under a temporary name and renamed (tar first, cuts
manifest last); the index lists a shard only once both files are in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from lhotse import MonoCut, Recording
from lhotse.audio import AudioSource
from lhotse.shar.writers import AudioTarWriter, JsonlShardWriter
from lhotse.utils import fastcopy

from .audio import AudioError
from .common import DataError, Problems, cut_path, stable_hash
from .shar import INDEX, SAMPLE_RATE, read_index
from .sources import load_cut, load_sources


def plan_shards(durations: list[float], ids: list[str], shard_seconds: float, seed: int) -> list[list[int]]:
    """Indices of the cuts of each shard: the cuts in a seeded random order (a pure function of
    their ids), cut into runs of about ``shard_seconds`` of audio."""
    order = sorted(range(len(ids)), key=lambda i: (stable_hash(f"{seed}/{ids[i]}"), ids[i]))
    shards, cur, secs = [], [], 0.0
    for i in order:
        cur.append(i)
        secs += durations[i]
        if secs >= shard_seconds:
            shards.append(cur)
            cur, secs = [], 0.0
    if cur:
        shards.append(cur)
    return shards


def _plan_digest(plan: list[list[str]], audio_format: str) -> str:
    h = hashlib.sha256(f"{audio_format}/{SAMPLE_RATE}".encode())
    for ids in plan:
        h.update(("\x1e" + "\x1f".join(ids)).encode())
    return h.hexdigest()[:24]


def _shard_names(k: int) -> dict[str, str]:
    return {"cuts": f"cuts.{k:06d}.jsonl.gz", "recording": f"recording.{k:06d}.tar"}


def _write_shard(out: Path, k: int, cuts: list, audio_format: str) -> dict:
    """Shard ``k``: decode each cut (16 kHz mono), encode it into the tar, its cut into the manifest;
    both written under a temporary folder, then renamed into ``out`` (tar first, manifest last).
    -> the index entry (names, count, seconds, skipped files)."""
    names = _shard_names(k)
    tmp = out / f".tmp-{k:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count, seconds, skipped = 0, 0.0, []
    with JsonlShardWriter(str(tmp / names["cuts"]), shard_size=None) as cw, \
            AudioTarWriter(str(tmp / names["recording"]), shard_size=None, format=audio_format) as aw:
        for cut in cuts:
            try:
                x = load_cut(cut, SAMPLE_RATE)
            except AudioError as e:
                skipped.append([cut_path(cut), str(e)])
                continue
            dur = len(x) / SAMPLE_RATE
            rec = Recording(id=cut.id, sources=[AudioSource(type="shar", channels=[0], source="")],
                            sampling_rate=SAMPLE_RATE, num_samples=len(x), duration=dur)
            aw.write(cut.id, x[None], SAMPLE_RATE, manifest=rec)
            sups = [_clip_supervision(s, cut.id, dur) for s in cut.supervisions]
            cw.write(MonoCut(id=cut.id, start=0.0, duration=dur, channel=0, recording=rec, supervisions=sups))
            count, seconds = count + 1, seconds + dur
    os.replace(tmp / names["recording"], out / names["recording"])
    os.replace(tmp / names["cuts"], out / names["cuts"])
    shutil.rmtree(tmp, ignore_errors=True)
    return {**names, "count": count, "seconds": round(seconds, 3), "skipped": skipped}


def _clip_supervision(sup, rec_id: str, duration: float):
    """A supervision moved onto the shard's recording (which begins where the cut began)."""
    return fastcopy(sup, recording_id=rec_id, start=max(sup.start, 0.0),
                    duration=min(sup.duration, duration - max(sup.start, 0.0)))


def _write_index(out: Path, index: dict) -> None:
    tmp = out / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False))
    os.replace(tmp, out / INDEX)


def write_shar(sources: list, out, shard_seconds: float = 1800.0, audio_format: str = "flac", workers: int = 1,
               seed: int = 0, progress: bool = True, log=print) -> dict:
    """Write ``sources`` as a Shar directory ``out`` (see the module docstring); rerunning the same call
    after an interruption writes only the shards still missing. -> summary (files, hours, shards,
    skipped). Unreadable, empty, truncated or NaN files are skipped and listed in
    ``out/skipped_files.tsv``."""
    from tqdm import tqdm

    if audio_format not in ("flac", "opus"):
        raise DataError(f"--audio-format {audio_format!r}: expected flac or opus")
    out = Path(out)
    problems = Problems()
    cuts = list(load_sources(list(sources), problems))  # folders are probed (once) to plan by duration
    plan_idx = plan_shards([c.duration for c in cuts], [c.id for c in cuts], shard_seconds, seed)
    plan = [[cuts[i].id for i in shard] for shard in plan_idx]
    digest = _plan_digest(plan, audio_format)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": "lhotse-shar", "writer": "svqmae data shard", "complete": False, "plan": digest,
             "sources": [str(s) for s in sources], "shard_seconds": shard_seconds, "audio_format": audio_format,
             "sample_rate": SAMPLE_RATE, "seed": seed, "shards": [None] * len(plan)}
    if (out / INDEX).is_file():
        old = read_index(str(out / INDEX))
        if old.get("plan") != digest:
            raise DataError(f"{out}: holds shards of other sources or settings (plan {old.get('plan')}, this one "
                            f"{digest}); write to a new --out")
        for k, e in enumerate(old["shards"]):  # finished shards stay, if their files are there
            if e is not None and all((out / e[f]).is_file() for f in ("cuts", "recording")):
                index["shards"][k] = e
    for tmp in out.glob(".tmp-*"):  # an interrupted run's half shards
        shutil.rmtree(tmp, ignore_errors=True)
    todo = [k for k, e in enumerate(index["shards"]) if e is None]
    _write_index(out, index)
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="shard", desc="shard", disable=not progress,
               dynamic_ncols=True)

    def done(k: int, entry: dict) -> None:
        index["shards"][k] = entry
        _write_index(out, index)
        bar.update(1)

    if workers <= 1:
        for k in todo:
            done(k, _write_shard(out, k, [cuts[i] for i in plan_idx[k]], audio_format))
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_write_shard, out, k, [cuts[i] for i in plan_idx[k]], audio_format): k for k in todo}
            for f in as_completed(futures):
                done(futures[f], f.result())
    bar.close()
    index["complete"] = True
    skipped = problems.items + [tuple(s) for e in index["shards"] for s in e["skipped"]]
    index.update(cuts=sum(e["count"] for e in index["shards"]),
                 seconds=round(sum(e["seconds"] for e in index["shards"]), 3), skipped=len(skipped))
    with open(out / "skipped_files.tsv", "w", encoding="utf-8") as f:
        f.write("path\treason\n")
        f.writelines(f"{p}\t{' '.join(r.split())}\n" for p, r in skipped)
    _write_index(out, index)
    summary = {"files": index["cuts"], "hours": index["seconds"] / 3600, "shards": len(plan), "skipped": len(skipped)}
    log(f"{out}: {summary['files']} files, {summary['hours']:.2f} h in {summary['shards']} shards; "
        f"{summary['skipped']} skipped" + (f" (listed in {out / 'skipped_files.tsv'})" if skipped else ""))
    return summary


