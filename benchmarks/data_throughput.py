"""Audio-seconds per second of the pre-training data loader alone (no model).

The loader must never be what limits training: compare its figure with the ``audio_seconds_per_s``
that ``svqmae pretrain`` logs (filterbanks are computed inside the model, on the GPU when there is
one, so the loader only decodes, resamples, crops and pads).

    .venv/bin/python benchmarks/data_throughput.py --data ../shared/data/speech_commands_dev/manifest.tsv
    .venv/bin/python benchmarks/data_throughput.py --data DIR --workers 0 2 4 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from svqmae.data import Problems, load_sources, pretrain_loader


def measure(cuts, workers: int, batch_seconds: float, utt_seconds: float, seconds: float, seed: int = 0) -> dict:
    """Iterate the loader (epoch after epoch) for about ``seconds``; the first batch (worker start-up)
    is not counted."""
    loader = pretrain_loader(cuts, batch_seconds, utt_seconds, num_buckets=10, num_workers=workers, seed=seed)
    audio = samples = batches = failed = 0
    t0 = None
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        for b in loader:
            if t0 is None:  # start the clock after the first batch: excludes worker start-up
                t0 = time.perf_counter()
                continue
            n = int(b["lengths"].sum())
            samples += n
            audio += n / 16000
            batches += 1
            failed += len(b["failed"])
            if time.perf_counter() - t0 >= seconds:
                dt = time.perf_counter() - t0
                return {"workers": workers, "batches": batches, "audio_seconds": round(audio, 1),
                        "wall_seconds": round(dt, 2), "audio_seconds_per_s": round(audio / dt, 1),
                        "batches_per_s": round(batches / dt, 2), "failed_files": failed}
        epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, metavar="SRC")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-seconds", type=float, default=320.0, help="audio per batch (train.max_batch_seconds)")
    ap.add_argument("--utt-seconds", type=float, default=15.0, help="crop length (train.max_utt_seconds)")
    ap.add_argument("--seconds", type=float, default=15.0, help="measure each setting for this long")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()

    problems = Problems()
    t = time.perf_counter()
    cuts = load_sources(args.data, problems)
    scan = time.perf_counter() - t
    hours = sum(c.duration for c in cuts) / 3600
    print(f"data: {len(cuts)} utterances, {hours:.2f} h, scanned in {scan:.1f} s; {len(problems)} unreadable")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    rows = []
    for w in args.workers:
        r = measure(cuts, w, args.batch_seconds, args.utt_seconds, args.seconds)
        rows.append(r)
        print(f"workers {w}: {r['audio_seconds_per_s']:,.0f} audio-seconds/s ({r['batches_per_s']:.1f} batches/s, "
              f"{r['audio_seconds']:.0f} s of audio in {r['wall_seconds']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"data": args.data, "utterances": len(cuts), "hours": hours, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
