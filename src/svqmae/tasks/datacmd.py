"""``svqmae data prepare|download|check|synth|shard``: corpora, manifests, the built-in demo corpus and
Shar directories for corpus-scale training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..data import DataError
from ..engine.args import number
from .outputs import output_file, output_folder


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_prepare(args) -> None:
    from ..data.recipes import prepare

    output_folder(args.out, "manifests")
    opts = {"test_dir": Path(args.test_dir) if args.test_dir else None, "label_from_folder": args.label_from_folder}
    if args.layout == "s3prl":
        return _prepare_s3prl(args, opts)
    summary = prepare(args.corpus, args.src, args.out, **opts)
    print(f"{'split':<16} {'utterances':>10} {'hours':>8}  labels")
    for split, s in summary.items():
        labels = ", ".join(f"{k} {v}" for k, v in s["labels"].items())
        print(f"{split:<16} {s['utterances']:>10} {s['hours']:>8.2f}  {labels}")
    print(f"manifests written to {args.out}/<split>.tsv and <split>_cuts.jsonl.gz")


def _prepare_s3prl(args, opts) -> None:
    from ..data.recipes import S3PRL_CONFIGS, prepare_s3prl

    summary = prepare_s3prl(args.corpus, args.src, args.out, **opts)
    print(f"{'s3prl split':<16} {'utterances':>10}  labels")
    for split, s in summary.items():
        print(f"{split:<16} {s['utterances']:>10}  {', '.join(f'{k} {v}' for k, v in s['labels'].items())}")
    print(f"s3prl layout written to {args.out}; run_downstream.py -c {Path(args.out) / S3PRL_CONFIGS[args.corpus]}")


def cmd_download(args) -> None:
    from ..data.recipes import download, remove_archives

    output_folder(args.out, "downloads")
    root = download(args.corpus, args.out, args.part or None, log=_log)
    if args.remove_archives:
        remove_archives(args.out)
    print(f"{args.corpus} is in {root}; next: svqmae data prepare {args.corpus} {root} --out DIR")


def cmd_check(args) -> None:
    from ..data import check_source

    if args.json:
        output_file(args.json, "check", "--json")
    failed, reports = 0, []
    for src in args.src:
        rep = check_source(src, decode=not args.headers_only, min_seconds=args.min_seconds)
        print(rep.summary())
        failed += len(rep.problems) + len(rep.problems.repeated)
        reports.append({
            "source": rep.source, "utterances": rep.count, "hours": rep.hours,
            "sample_rates": dict(rep.rates), "channels": dict(rep.channels), "labels": dict(rep.labels),
            "speakers": len(rep.speakers), "problems": [{"path": p, "reason": r} for p, r in rep.problems.items],
            "repeated": [{"path": p, "reason": r} for p, r in rep.problems.repeated],
            **({"shards": rep.shards} if rep.shards is not None else {}),
        })
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, ensure_ascii=False))
    if failed and args.strict:
        raise DataError(f"{failed} problem file(s) or repeated item(s) found (listed above)")


def cmd_synth(args) -> None:
    from ..data.synth import synthesize

    output_folder(args.out, "corpus")
    s = synthesize(args.out, minutes=args.minutes, seed=args.seed, workers=args.workers, log=_log)
    print(f"{'task':<10} {'split':<6} {'utts':>6} {'minutes':>8} {'speakers':>9}")
    for task, splits in s["tasks"].items():
        for split, t in splits.items():
            print(f"{task:<10} {split:<6} {t['utterances']:>6} {t['minutes']:>8.2f} {t['speakers']:>9}")


def cmd_shard(args) -> None:
    from ..data.shar_writer import write_shar

    output_folder(args.out, "shar")
    write_shar(args.src, args.out, shard_seconds=args.shard_seconds, audio_format=args.audio_format,
               workers=args.workers, seed=args.seed, progress=not args.quiet, log=print)


def add_cli(sub) -> None:
    from ..data.recipes import DOWNLOADS, RECIPES

    p = sub.add_parser("data", help="prepare corpora, check sources, synthesize the demo corpus")
    dsub = p.add_subparsers(dest="data_command", required=True)

    q = dsub.add_parser("prepare", help="write manifests (TSV + lhotse) for a corpus on disk, with SUPERB splits")
    q.add_argument("corpus", choices=sorted(RECIPES), help="which corpus (folder: any folder of audio)")
    q.add_argument("src", metavar="SRC_DIR", help="the corpus as extracted from its archives")
    q.add_argument("--out", required=True, metavar="DIR", help="manifests folder (train/dev/test TSV and lhotse manifests)")
    q.add_argument("--test-dir", metavar="DIR", help="speechcommands: the speech_commands_test_set_v0.01 folder "
                   "(default: looked for beside or inside SRC_DIR)")
    q.add_argument("--label-from-folder", action="store_true", help="folder: label = the parent folder's name")
    q.add_argument("--layout", choices=["manifests", "s3prl"], default="manifests",
                   help="s3prl: instead of manifests, the folders/metadata and config that s3prl's run_downstream.py "
                   "reads (speechcommands, iemocap)")
    q.set_defaults(func=cmd_prepare)

    q = dsub.add_parser("download", help="download, verify (checksums) and extract a public corpus")
    q.add_argument("corpus", choices=sorted([*DOWNLOADS, "iemocap"]), help="which corpus")
    q.add_argument("--out", required=True, metavar="DIR", help="folder the corpus is downloaded and extracted into")
    q.add_argument("--part", action="append", help="corpus part, e.g. train-clean-100 (repeatable; "
                   "librispeech default: the dev/test parts and train-clean-100)")
    q.add_argument("--remove-archives", action="store_true", help="delete the archives after extraction")
    q.set_defaults(func=cmd_download)

    q = dsub.add_parser("check", help="scan sources: counts, hours, durations, rates, channels, every problem file "
                        "(a Shar directory: also its shards, each read to its end)")
    q.add_argument("src", nargs="+", metavar="SRC", help="folder, TSV/CSV manifest, lhotse manifest or Shar directory")
    q.add_argument("--headers-only", action="store_true", help="read headers only (fast; misses truncated/NaN files)")
    q.add_argument("--min-seconds", type=number(">= 0", float), default=0.5, help="count utterances shorter than this")
    q.add_argument("--strict", action="store_true", help="exit with an error if any file has a problem")
    q.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    q.set_defaults(func=cmd_check)

    q = dsub.add_parser("shard", help="write sources as a lhotse Shar directory (audio in tar shards) for "
                        "streamed, corpus-scale training; rerun to continue an interrupted run")
    q.add_argument("src", nargs="+", metavar="SRC", help="folder, TSV/CSV manifest or lhotse manifest")
    q.add_argument("--out", required=True, metavar="DIR",
                   help="the Shar directory to write (rerun with it to finish an interrupted run)")
    q.add_argument("--shard-seconds", type=number("> 0", float), default=1800.0,
                   help="about this much audio per shard (default 1800 = 30 min, ~40 MB of FLAC)")
    q.add_argument("--audio-format", choices=["flac", "opus"], default="flac",
                   help="how the audio is stored in the tars (flac: lossless)")
    q.add_argument("--workers", type=number(">= 1"), default=1, help="shards written in parallel (processes)")
    q.add_argument("--seed", type=int, default=0, help="the order of the cuts over the shards")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_shard)

    q = dsub.add_parser("synth", help="synthesize the built-in demo corpus with eSpeak NG")
    q.add_argument("--out", required=True, metavar="DIR", help="folder of the demo corpus")
    q.add_argument("--minutes", type=float, default=30.0, help="about this many minutes of audio (default 30)")
    q.add_argument("--seed", type=int, default=0, help="every byte of the corpus is a function of the seed and --minutes")
    q.add_argument("--workers", type=number(">= 1"), help="processes (default: one per CPU core)")
    q.set_defaults(func=cmd_synth)
