"""Representation quality at an equal pre-training budget, SUPERB-style (frozen features, linear probe).

Models: SVQ-MAE (``svqmae pretrain``), its encoder-only ablation (``--set model.variant=encoder_only``),
wav2vec 2.0 (Hugging Face ``Wav2Vec2ForPreTraining``, same size, data and minutes; benchmarks/hf_wav2vec2.py),
the same architecture untrained (``random``), SUPERB's FBANK baseline (``fbank``: frames mean-pooled) and
the same filterbanks with statistics pooling (``fbank-stats``: each dimension's mean and standard deviation).
Tasks: 12-class keyword spotting on speech_commands_dev (train and test on speaker-disjoint halves),
spoken digits on fsdd (3-fold cross-validation by speaker: every test speaker is unseen) and, when
emodb_dev is there, 7-class acted emotion (5-fold cross-validation by speaker).
Pre-training data: speechocean762_dev + aishell1_dev.

    # pre-train all three for 30 minutes each, then evaluate (writes OUT/quality.md)
    python benchmarks/quality.py --minutes 30 --device cpu --out runs/quality
    # only evaluate existing models
    python benchmarks/quality.py --svqmae runs/quality/svqmae --encoder-only runs/quality/encoder_only \\
        --wav2vec2 runs/quality/wav2vec2 --out runs/quality
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from svqmae.data import load_source  # noqa: E402
from svqmae.tasks.evaluate import evaluate, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pre-training


def pretrain_svqmae(sources: list[Path], out: Path, minutes: float, device: str, preset: str,
                    variant: str, steps: int | None) -> Path:
    """``svqmae pretrain`` in a subprocess (``--device cpu`` hides GPUs from it)."""
    cmd = [sys.executable, "-m", "svqmae.cli", "pretrain", "--out", str(out), "--preset", preset,
           "--max-minutes", str(minutes), "--set", f"model.variant={variant}"]
    for s in sources:
        cmd += ["--data", str(s)]
    cmd += ["--max-steps", str(steps or 10**6)]  # without --steps only the time budget binds
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log(f"$ {' '.join(cmd)}")
    subprocess.run(cmd, check=True, env=env)
    return out / "model"


def pretrain_all(args, sources: list[Path]) -> dict[str, Path]:
    from hf_wav2vec2 import pretrain_wav2vec2

    out = Path(args.out)
    dirs = {}
    if not args.svqmae:
        dirs["svqmae"] = pretrain_svqmae(sources, out / "svqmae", args.minutes, args.device, args.preset,
                                         "svqmae", args.steps)
    if not args.encoder_only:
        dirs["encoder_only"] = pretrain_svqmae(sources, out / "encoder_only", args.minutes, args.device,
                                               args.preset, "encoder_only", args.steps)
    if not args.wav2vec2:
        dirs["wav2vec2"] = pretrain_wav2vec2([str(s) for s in sources], out / "wav2vec2", args.minutes,
                                             args.w2v_size, args.device, max_steps=args.steps, lr=args.w2v_lr)
    return dirs


# --------------------------------------------------------------------------- evaluation data


def speaker_halves(manifest: Path, out_dir: Path) -> tuple[Path, Path]:
    """Split a manifest into two speaker-disjoint halves (items without a speaker are split by path),
    written as manifests with absolute paths."""
    cuts = load_source(manifest)
    header = "path\tspeaker\tlabel\ttext"
    halves: tuple[list[str], list[str]] = ([], [])
    for cut in cuts:
        sup = cut.supervisions[0]
        key = sup.speaker or cut.id
        side = hashlib.blake2b(key.encode(), digest_size=4).digest()[0] % 2
        path = cut.recording.sources[0].source
        halves[side].append(f"{Path(path).resolve()}\t{sup.speaker or ''}\t{(sup.custom or {}).get('label', '')}"
                            f"\t{sup.text or ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "test"), halves):
        p = out_dir / f"{manifest.parent.name}_{name}.tsv"
        p.write_text("\n".join([header, *rows]) + "\n")
        paths.append(p)
    return paths[0], paths[1]


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality", help="output folder (models, reports, quality.md)")
    ap.add_argument("--minutes", type=float, default=30.0, help="pre-training budget per model (wall-clock)")
    ap.add_argument("--steps", type=int, help="also cap pre-training at this many steps; both learning-rate "
                    "schedules decay over them (default: no cap, the time budget binds)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="tiny", help="svqmae preset (and the random baseline's)")
    ap.add_argument("--w2v-size", default="tiny", choices=["tiny", "base"], help="wav2vec 2.0 size (tiny = 4 x 256)")
    ap.add_argument("--w2v-lr", type=float, default=5e-4, help="wav2vec 2.0 peak learning rate")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA), help="folder holding the four dev sets")
    ap.add_argument("--svqmae", help="existing SVQ-MAE model (skip its pre-training)")
    ap.add_argument("--encoder-only", help="existing encoder-only model (skip its pre-training)")
    ap.add_argument("--wav2vec2", help="existing HF wav2vec 2.0 folder (skip its pre-training)")
    ap.add_argument("--skip", action="append", default=[], help="leave a model out: svqmae, encoder_only, wav2vec2, "
                    "random, fbank, fbank-stats (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = Path(args.data_root)
    need = ["speechocean762_dev", "aishell1_dev", "speech_commands_dev", "fsdd"]
    missing = [n for n in need if not (data / n / "manifest.tsv").is_file()]
    if missing:
        sys.exit(f"quality.py: {data}: missing {', '.join(missing)} (give --data-root)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sources = [data / "speechocean762_dev" / "manifest.tsv", data / "aishell1_dev" / "manifest.tsv"]
    for name in ("svqmae", "encoder_only", "wav2vec2"):
        if name in args.skip:
            setattr(args, name, "-")
    trained = pretrain_all(args, sources)
    pre_minutes = (time.monotonic() - t0) / 60

    def given(flag, name):
        return flag if flag and flag != "-" else (str(trained[name]) if name in trained else None)

    models = {
        "SVQ-MAE": given(args.svqmae, "svqmae"),
        "encoder-only": given(args.encoder_only, "encoder_only"),
        "wav2vec 2.0 (HF)": ("hf:" + given(args.wav2vec2, "wav2vec2")) if given(args.wav2vec2, "wav2vec2") else None,
        "random init": None if "random" in args.skip else f"random:{args.preset}",
        "fbank": None if "fbank" in args.skip else "fbank",
        "fbank (mean+std)": None if "fbank-stats" in args.skip else "fbank-stats",
    }
    models = {k: v for k, v in models.items() if v}
    ks_train, ks_test = speaker_halves(data / "speech_commands_dev" / "manifest.tsv", out / "splits")
    tasks = {
        "ks": dict(task="ks", train=str(ks_train), test=str(ks_test)),
        "digits": dict(task="classify", train=str(data / "fsdd" / "manifest.tsv"), folds=3, fold_by="speaker"),
    }
    if (data / "emodb_dev" / "manifest.tsv").is_file():  # acted emotion, 7 classes; 5 folds of 2 actors
        tasks["emotion"] = dict(task="er", train=str(data / "emodb_dev" / "manifest.tsv"), folds=5, fold_by="speaker")
    reports = []
    for label, spec in models.items():
        for tname, t in tasks.items():
            opts = {k: v for k, v in t.items() if k not in ("task", "train", "test")}
            r = evaluate(spec, t["task"], t["train"], t.get("test"), out=str(out / "eval" / f"{tname}_{_slug(label)}"),
                         cache=str(out / "features"), seed=args.seed, **opts)
            r["model"], r["task"] = label, tname
            reports.append(r)
    table = markdown_table(reports)
    steps = {}
    for name, d in (("SVQ-MAE", models.get("SVQ-MAE")), ("encoder-only", models.get("encoder-only"))):
        if d:
            steps[name] = _svqmae_steps(Path(d))
    w2v = models.get("wav2vec 2.0 (HF)")
    if w2v and (Path(w2v[3:]) / "pretrain.json").is_file():
        steps["wav2vec 2.0 (HF)"] = json.loads((Path(w2v[3:]) / "pretrain.json").read_text())["steps"]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs" + (
        f", {torch.cuda.get_device_name()}" if args.device == "cuda" and torch.cuda.is_available() else "")
    given_models = any(models.get(k) for k in ("SVQ-MAE", "encoder-only", "wav2vec 2.0 (HF)"))
    budget = (f"{args.minutes} min per model" if trained
              else "models given on the command line" if given_models else "none (baselines only)")
    note = (f"Pre-training: {budget}; evaluation on {args.device} ({machine})"
            + ("; steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()) if steps else "")
            + f". Keyword spotting: 12 classes, speaker-disjoint halves ({ks_train.name} / {ks_test.name}); digits: "
            "fsdd, 3-fold cross-validation by speaker; emotion: emodb_dev, 5-fold by speaker. Accuracy %, 95% "
            "bootstrap interval over test items; head learning rate chosen on dev (evaluate --lr auto). fbank pools "
            "the filterbank frames by their mean (SUPERB), fbank (mean+std) by mean and standard deviation.")
    text = f"{table}\n\n{note}\n"
    print(text)
    (out / "quality.md").write_text(text)
    (out / "quality.json").write_text(json.dumps({"reports": reports, "steps": steps, "args": vars(args),
                                                  "pretrain_minutes_total": round(pre_minutes, 1)}, indent=2))
    log(f"written {out / 'quality.md'} ({(time.monotonic() - t0) / 60:.1f} min in all)")


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_").lower()


def _svqmae_steps(model_dir: Path) -> int | str:
    run = model_dir.parent if model_dir.name == "model" else model_dir
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (
        run / "metrics.jsonl").is_file() else []
    return max((r["step"] for r in rows), default="?")


if __name__ == "__main__":
    main()
