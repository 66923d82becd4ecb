"""Corpus-scale data: time from ``svqmae pretrain``'s start to its first training step, and the peak
RSS of that (single-rank, ``num_workers=0``) process, for 10k, 100k and 1M cuts given as a TSV with
``seconds``, a lhotse cuts manifest (``.jsonl.gz``) and a Shar directory; then the loader alone,
Shar against loose files with 0, 1 and 2 workers (``compare_loaders``): audio-seconds per CPU-second
(this process and its workers) and per wall-second over whole epochs, the two arms alternating, on
the same FLAC bytes (the Shar's own members written out as loose files: speech_commands' 1-second
16 kHz cuts, and the base set's short ones), and on the base set's files as distributed.

The corpora repeat a small set of files (the first 200 of ../shared/data/fsdd if present, else
generated tones), each cut with its own id. The 10k Shar directory is written by ``svqmae data
shard`` (its time is reported); the 100k and 1M ones are assembled from the encoded audio of that
set, copied into lhotse's tar layout (the same format, written without re-encoding).

    .venv/bin/python benchmarks/data_scale.py --out /tmp/data_scale --json runs/data_scale.json
    .venv/bin/python benchmarks/data_scale.py --sizes 10000 --loader-only    # the loader comparison alone
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from svqmae.data import load_source  # noqa: E402
from svqmae.data.audio import write_audio  # noqa: E402
from svqmae.data.loader import pretrain_loader, shar_loader  # noqa: E402
from svqmae.data.shar import INDEX, open_shar  # noqa: E402
from svqmae.data.shar_writer import write_shar  # noqa: E402

FSDD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fsdd"
SPEECH_COMMANDS = FSDD.parent / "speech_commands_dev" / "manifest.tsv"
TINY = ["model.encoder.layers=1", "model.encoder.dim=32", "model.encoder.heads=2", "model.encoder.ffn_dim=64",
        "model.decoder.layers=1", "model.decoder.dim=32", "model.decoder.heads=2", "model.decoder.ffn_dim=64",
        "model.quantizer.codebook_size=32", "train.max_batch_seconds=20", "train.max_utt_seconds=2",
        "train.min_utt_seconds=0.1", "train.num_workers=0", "train.val_items=8", "train.log_every=1",
        "train.ckpt_every_steps=0", "train.ckpt_every_minutes=0", "train.val_every=1000", "train.warmup_steps=1"]


def base_set(root: Path, n: int = 200) -> list[tuple[str, float]]:
    """(absolute path, seconds) of the files every corpus repeats."""
    fsdd = Path(os.environ.get("FSDD", FSDD)).resolve()
    if (fsdd / "manifest.tsv").is_file():
        rows = [line.split("\t") for line in (fsdd / "manifest.tsv").read_text().splitlines()[1:n + 1]]
        return [(str(fsdd / r[0]), float(r[1])) for r in rows]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        secs = float(rng.uniform(0.3, 0.8))
        t = np.arange(int(secs * 16000)) / 16000
        p = write_audio(root / "tones" / f"t{i:03d}.wav", 0.3 * np.sin(2 * np.pi * (120 + 3 * i) * t), 16000)
        out.append((str(p), round(secs, 3)))
    return out


def write_tsv(path: Path, base, n: int) -> Path:
    with open(path, "w") as f:
        f.write("path\tseconds\n")
        for i in range(n):
            p, s = base[i % len(base)]
            f.write(f"{p}\t{s}\n")
    return path


def _cut_json(cid: str, path: str, secs: float) -> str:
    """One lhotse MonoCut line (the layout CutSet.to_file writes) for a whole file."""
    return json.dumps({"id": cid, "start": 0, "duration": secs, "channel": 0, "supervisions": [],
                       "recording": {"id": cid, "sources": [{"type": "file", "channels": [0], "source": path}],
                                     "sampling_rate": 16000, "num_samples": int(round(secs * 16000)),
                                     "duration": secs, "channel_ids": [0]}, "type": "MonoCut"})


def write_cuts(path: Path, base, n: int) -> Path:
    with gzip.open(path, "wt", compresslevel=1) as f:
        for i in range(n):
            p, s = base[i % len(base)]
            f.write(_cut_json(f"c{i:07d}", p, s) + "\n")
    return path


def assemble_shar(out: Path, small: Path, n: int, per_shard: int = 5000) -> Path:
    """A Shar dir of ``n`` cuts from the encoded members of the small one ``small`` (ids made unique)."""
    members = []  # (flac bytes, recording json dict, cut dict)
    for e in json.loads((small / INDEX).read_text())["shards"]:
        with tarfile.open(small / e["recording"]) as t:
            blobs = [t.extractfile(m).read() for m in t.getmembers()]  # audio, metadata, audio, ...
        cuts = [json.loads(line) for line in gzip.open(small / e["cuts"], "rt")]
        for k, c in enumerate(cuts):
            members.append((blobs[2 * k], json.loads(blobs[2 * k + 1]), c))
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(0, n, per_shard):
        names = {"cuts": f"cuts.{k // per_shard:06d}.jsonl.gz", "recording": f"recording.{k // per_shard:06d}.tar"}
        secs = 0.0
        with tarfile.open(out / names["recording"], "w") as t, gzip.open(out / names["cuts"], "wt", compresslevel=1) as cf:
            for i in range(k, min(n, k + per_shard)):
                flac, rec, cut = members[i % len(members)]
                cid = f"s{i:07d}"
                for name, data in ((f"{cid}.flac", flac), (f"{cid}.json", json.dumps(dict(rec, id=cid)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
                cf.write(json.dumps(dict(cut, id=cid, recording=dict(cut["recording"], id=cid), supervisions=[])) + "\n")
                secs += cut["duration"]
        shards.append({**names, "count": min(n, k + per_shard) - k, "seconds": round(secs, 3), "skipped": []})
    (out / INDEX).write_text(json.dumps({"format": "lhotse-shar", "complete": True, "shards": shards}))
    return out


def first_step(data: Path, out: Path) -> dict:
    """Run ``svqmae pretrain --max-steps 1`` on ``data``; seconds until it logs step 1, peak RSS (VmHWM)."""
    cmd = [sys.executable, "-m", "svqmae.cli", "pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny",
           "--max-steps", "1", *[a for o in TINY for a in ("--set", o)]]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL, env=env)
        hwm, first = 0, None
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmHWM"):
                        hwm = max(hwm, int(line.split()[1]))
            except OSError:
                pass
            if first is None and "step 1/1" in log.read_text():
                first = time.perf_counter() - t0
            time.sleep(0.05)
    if first is None or proc.returncode != 0:
        raise RuntimeError(f"{data}: no first step\n{log.read_text()[-3000:]}")
    return {"first_step_s": round(first, 1), "peak_rss_gb": round(hwm / 2**20, 3)}


def loose_copy(shar_dir: Path, out: Path) -> Path:
    """The audio of a Shar directory as loose files: each tar member written out as its own file (the
    very bytes the Shar loader decodes) + a TSV with seconds; -> the TSV."""
    if (out / "m.tsv").is_file():
        return out / "m.tsv"
    rows = ["path\tseconds"]
    for e in json.loads((shar_dir / INDEX).read_text())["shards"]:
        cuts = [json.loads(line) for line in gzip.open(shar_dir / e["cuts"], "rt")]
        with tarfile.open(shar_dir / e["recording"]) as t:
            audio = [m for m in t.getmembers() if not m.name.endswith(".json")]
            for k, (m, c) in enumerate(zip(audio, cuts)):
                path = out / "audio" / f"{e['recording'][:-4]}_{k:05d}{Path(m.name).suffix}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(t.extractfile(m).read())
                rows.append(f"{path}\t{c['duration']}")
    (out / "m.tsv").write_text("\n".join(rows) + "\n")
    return out / "m.tsv"


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its children that have ended (loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def loader_cost(passes) -> dict:
    """Read ``passes`` (built loaders, each to its end): audio-seconds delivered, CPU seconds spent
    by this process and its loader workers (their start-up, buffer fills and prefetches included,
    building the loaders not) and wall seconds."""
    audio, wall, cpu = 0.0, time.perf_counter(), _cpu_seconds()
    for loader in passes:
        for b in loader:
            audio += float(b["lengths"].sum()) / 16000
    return {"audio_s": audio, "cpu_s": _cpu_seconds() - cpu, "wall_s": time.perf_counter() - wall}


def _loose_epochs(cuts, workers: int, epochs: int):
    """The loose-file loader, built, as one pass per epoch (its workers end with each pass)."""
    loader = pretrain_loader(cuts, 60, 2, 10, workers, 0)

    def passes():
        for e in range(epochs):
            loader.sampler.set_epoch(e)
            yield loader
    return passes()


def _shar_epochs(shar, workers: int, epochs: int) -> list:
    """The Shar loader, built, as one stream of ``epochs`` epochs."""
    return [shar_loader(shar, 60, 2, 10, workers, 0, 2000, epochs=epochs)]


def lazy_copy(cuts, path: Path):
    """The same loose-file cuts as a lhotse manifest opened lazily: how loose files come at corpus scale
    (svqmae reads a manifest over ``LAZY_MANIFEST_BYTES`` this way), each cut parsed on every pass."""
    from lhotse import CutSet

    if not path.is_file():
        cuts.to_file(path)
    return CutSet.from_jsonl_lazy(path)


def compare_loaders(conditions: dict, workers=(0, 1, 2), audio_s: float = 2500, reps: int = 3, log=print,
                    lazy: bool = False) -> list[dict]:
    """For each condition {name: (loose TSV, Shar dir)} and worker count: the loose-file loader and the
    Shar loader on the same batching (60-second batches, 2-second crops, Shar buffer 2000), whole
    epochs (at least ``audio_s`` of audio), ``reps`` times, alternating (loose, Shar, loose, Shar,
    ...), so that both see the same machine load. With ``lazy``, a third arm: the same loose files
    from a lazily read lhotse manifest (the corpus-scale case). -> one row per condition x workers:
    median audio-seconds per CPU-second and per wall-second of each, and the median of the
    per-repetition Shar / loose ratios (and Shar / lazy)."""
    rows = []
    for name, (tsv, shar_dir) in conditions.items():
        loose, shar = load_source(tsv), open_shar(shar_dir)
        epochs = max(1, math.ceil(audio_s / sum(shar.seconds)))
        lazy_cuts = lazy_copy(loose, Path(tsv).with_suffix(".jsonl.gz")) if lazy else None
        for w in workers:
            make = {"loose": partial(_loose_epochs, loose, w, epochs),
                    "shar": partial(_shar_epochs, shar, w, epochs)}
            if lazy:
                make["lazy"] = partial(_loose_epochs, lazy_cuts, w, epochs)
            got = {arm: [] for arm in make}
            for _ in range(reps):
                for arm in make:
                    got[arm].append(loader_cost(make[arm]()))
            row = {"condition": name, "workers": w, "epochs": epochs}
            for arm, runs in got.items():
                row[f"{arm}_per_cpu_s"] = round(float(np.median([r["audio_s"] / r["cpu_s"] for r in runs])), 1)
                row[f"{arm}_per_wall_s"] = round(float(np.median([r["audio_s"] / r["wall_s"] for r in runs])), 1)
            for other, suffix in (("loose", ""), ("lazy", "_lazy")):
                for unit in ("cpu", "wall") if other in got else ():
                    row[f"ratio_{unit}{suffix}"] = round(float(np.median([
                        (s["audio_s"] / s[f"{unit}_s"]) / (lo["audio_s"] / lo[f"{unit}_s"])
                        for lo, s in zip(got[other], got["shar"])])), 3)
            rows.append(row)
            log(f"loader {name:<38} workers {w}: audio-s per CPU-s loose {row['loose_per_cpu_s']:>6,.0f} "
                f"Shar {row['shar_per_cpu_s']:>6,.0f} (x{row['ratio_cpu']:.2f}); per wall-s loose "
                f"{row['loose_per_wall_s']:>6,.0f} Shar {row['shar_per_wall_s']:>6,.0f} (x{row['ratio_wall']:.2f})"
                + (f"; lazy manifest: per CPU-s {row['lazy_per_cpu_s']:>6,.0f} (Shar x{row['ratio_cpu_lazy']:.2f}), "
                   f"per wall-s {row['lazy_per_wall_s']:>6,.0f} (x{row['ratio_wall_lazy']:.2f})" if lazy else ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/data_scale", metavar="DIR", help="where the corpora are written")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--loader-only", action="store_true", help="skip the first-step runs: loader comparison only")
    ap.add_argument("--loader-audio", type=float, default=2500, metavar="SECONDS",
                    help="loader comparison: whole epochs of at least this much audio per run")
    ap.add_argument("--reps", type=int, default=3, help="loader comparison: runs per arm, alternating")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--speech-commands", default=str(SPEECH_COMMANDS), metavar="TSV",
                    help="16 kHz 1-second utterances for the loader comparison (skipped if absent)")
    ap.add_argument("--lazy-loose", action="store_true",
                    help="loader comparison: a third arm, the loose files from a lazily read lhotse manifest")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    base = base_set(root)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
          f"base set: {len(base)} files ({'fsdd' if 'fsdd' in base[0][0] else 'generated tones'})", flush=True)

    small = root / f"shar_{args.sizes[0]}"
    tsv0 = write_tsv(root / f"m_{args.sizes[0]}.tsv", base, args.sizes[0])
    t = time.perf_counter()
    if not (small / INDEX).is_file():
        write_shar([str(tsv0)], small, shard_seconds=300, progress=False, log=lambda m: None)
    shard_s = time.perf_counter() - t
    print(f"svqmae data shard of {args.sizes[0]} cuts: {shard_s:.1f} s", flush=True)

    rows = []
    for n in [] if args.loader_only else args.sizes:
        sources = {"tsv (seconds)": write_tsv(root / f"m_{n}.tsv", base, n),
                   "lhotse jsonl.gz": write_cuts(root / f"cuts_{n}.jsonl.gz", base, n),
                   "Shar": small if n == args.sizes[0] else (root / f"shar_{n}" if (root / f"shar_{n}" / INDEX).is_file()
                                                             else assemble_shar(root / f"shar_{n}", small, n))}
        for kind, src in sources.items():
            r = {"cuts": n, "source": kind, **first_step(src, root / "runs" / f"{kind[:4]}_{n}")}
            rows.append(r)
            print(f"{n:>9,} cuts  {kind:<16} first step {r['first_step_s']:>6.1f} s   peak RSS {r['peak_rss_gb']:.2f} GB",
                  flush=True)

    # the loader alone: the same audio (the Shar's own FLAC members as loose files), and fsdd as distributed
    conditions = {}
    sc = Path(args.speech_commands)
    if sc.is_file():
        sc_shar = root / "shar_speech_commands"
        if not (sc_shar / INDEX).is_file():
            write_shar([str(sc)], sc_shar, shard_seconds=300, progress=False, log=lambda m: None)
        conditions["speech_commands 1 s, same FLAC bytes"] = (loose_copy(sc_shar, root / "loose_speech_commands"), sc_shar)
    conditions[f"base set {args.sizes[0]}, same FLAC bytes"] = (loose_copy(small, root / "loose_small"), small)
    conditions[f"base set {args.sizes[0]}, loose as distributed"] = (tsv0, small)
    speed = compare_loaders(conditions, args.workers, args.loader_audio, args.reps, log=lambda m: print(m, flush=True),
                            lazy=args.lazy_loose)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"shard_seconds": shard_s, "first_step": rows, "loader": speed}, indent=1))


if __name__ == "__main__":
    main()
