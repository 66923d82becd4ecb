"""Corpus-scale data: time from ``svqmae pretrain``'s start to its first training step, and the peak
RSS of that (single-rank, ``num_workers=0``) process, for 10k, 100k and 1M cuts given as a TSV with
``seconds``, a lhotse cuts manifest (``.jsonl.gz``) and a Shar directory; then loader
audio-seconds per second from Shar and from loose files with 0, 1 and 2 workers.

The corpora repeat a small set of files (the first 200 of ../shared/data/fsdd if present, else
generated tones), each cut with its own id. The 10k Shar directory is written by ``svqmae data
shard`` (its time is reported); the 100k and 1M ones are assembled from the encoded audio of that
set, copied into lhotse's tar layout (the same format, written without re-encoding).

    .venv/bin/python benchmarks/data_scale.py --out /tmp/data_scale --json runs/data_scale.json
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
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


def throughput(make_loader, seconds: float) -> float:
    """Audio-seconds per second of a loader over about ``seconds`` (after its first batch)."""
    audio, t0 = 0.0, None
    for b in make_loader():
        if t0 is None:
            t0 = time.perf_counter()
            continue
        audio += float(b["lengths"].sum()) / 16000
        if time.perf_counter() - t0 >= seconds:
            return audio / (time.perf_counter() - t0)
    return audio / max(time.perf_counter() - t0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/data_scale", metavar="DIR", help="where the corpora are written")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--seconds", type=float, default=8.0, help="loader throughput: measure each setting this long")
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
    for n in args.sizes:
        sources = {"tsv (seconds)": write_tsv(root / f"m_{n}.tsv", base, n),
                   "lhotse jsonl.gz": write_cuts(root / f"cuts_{n}.jsonl.gz", base, n),
                   "Shar": small if n == args.sizes[0] else (root / f"shar_{n}" if (root / f"shar_{n}" / INDEX).is_file()
                                                             else assemble_shar(root / f"shar_{n}", small, n))}
        for kind, src in sources.items():
            r = {"cuts": n, "source": kind, **first_step(src, root / "runs" / f"{kind[:4]}_{n}")}
            rows.append(r)
            print(f"{n:>9,} cuts  {kind:<16} first step {r['first_step_s']:>6.1f} s   peak RSS {r['peak_rss_gb']:.2f} GB",
                  flush=True)

    loose = load_source(tsv0)
    shar = open_shar(small)
    speed = []
    for w in (0, 1, 2):
        for kind, make in (("loose files", lambda w=w: pretrain_loader(loose, 60, 2, 10, w, 0, start=(0, 0))),
                           ("Shar", lambda w=w: shar_loader(shar, 60, 2, 10, w, 0, 2000))):
            s = throughput(make, args.seconds)
            speed.append({"source": kind, "workers": w, "audio_seconds_per_s": round(s, 1)})
            print(f"loader {kind:<12} workers {w}: {s:,.0f} audio-s/s", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"shard_seconds": shard_s, "first_step": rows, "loader": speed}, indent=1))


if __name__ == "__main__":
    main()
