"""``svqmae evaluate``: several models x several tasks, one report each and a markdown table."""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import ConfigError
from ...engine.args import number
from ..outputs import output_file, output_folder
from .items import DEFAULTS, TASKS
from .protocol import evaluate
from .report import markdown_table
from .upstreams import get_upstream


def _per_task(values: list[str] | None, tasks: list[str], flag: str) -> list[str | None]:
    if not values:
        return [None] * len(tasks)
    if len(values) == 1:
        return values * len(tasks)
    if len(values) != len(tasks):
        raise ConfigError(f"evaluate: give {flag} once, or once per --task ({len(tasks)} tasks, {len(values)} {flag})")
    return [None if v == "-" else v for v in values]  # "-": none for that task (e.g. er with --folds)


def _run_name(model: str, task: str) -> str:
    p = Path(model.removeprefix("hf:"))
    name = p.parent.name if p.name == "model" else p.name
    prefix = "hf-" if model.startswith("hf:") else ""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in prefix + name) or "model"
    return f"{task}_{slug}"


def cmd_evaluate(args) -> None:
    tasks, models = args.task, list(dict.fromkeys(args.model))
    trains = _per_task(args.train, tasks, "--train")
    tests = _per_task(args.test, tasks, "--test")
    devs = _per_task(args.dev, tasks, "--dev")
    options = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    options["progress"] = not args.quiet
    runs = [(m, t, tr, te, dv) for m in models for t, tr, te, dv in zip(tasks, trains, tests, devs)]
    single = len(runs) == 1
    out = Path(args.out)
    if not single and out.suffix == ".json":
        raise ConfigError(f"{out}: several models or tasks write several reports; give a folder as --out")
    if single and out.suffix == ".json":
        output_file(out, "evaluate")
    else:
        output_folder(out, "evaluate")
    if args.cache:
        output_folder(args.cache, "cache", "--cache")
    if not single:
        options.setdefault("cache", str(out / "features"))
    reports = []
    device = options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    for m in models:
        upstream = get_upstream(m, device)  # loaded once for all its tasks
        for mm, t, tr, te, dv in runs:
            if mm == m:
                dest = out if single else out / _run_name(m, t)
                reports.append(evaluate(upstream, t, tr, te, dv, out=str(dest), **options))
        del upstream
    table = markdown_table(reports)
    print(table)
    table_path = (out.parent / f"{out.stem}.md") if single and out.suffix == ".json" else out / "results.md"
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table + "\n")


def add_cli(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="SUPERB-style evaluation of frozen features (keyword spotting, emotion, ASR, ...)",
        description="Frozen upstream, cached features, weighted sum of layers, small head; report.json with "
                    "a 95% bootstrap interval, plots, and a markdown table for several models or tasks.",
    )
    p.add_argument("--model", action="append", required=True, metavar="M",
                   help="svqmae model/ or run DIR, fbank (SUPERB's filterbank baseline, frames mean-pooled), "
                        "fbank-stats (the same, pooled by mean and standard deviation), random[:PRESET], "
                        "or hf:PATH (repeatable)")
    p.add_argument("--task", action="append", required=True, choices=sorted(TASKS),
                   help="classify (label column), ks, er (SUPERB settings), asr (text column) (repeatable)")
    p.add_argument("--train", action="append", required=True, metavar="SRC",
                   help="training data: TSV manifest or folder (once, or once per --task)")
    p.add_argument("--test", action="append", metavar="SRC", help="test data (once, or once per --task; '-' for none, e.g. er with folds)")
    p.add_argument("--dev", action="append", metavar="SRC",
                   help="dev data for model selection (default: hold out part of train by speaker)")
    p.add_argument("--out", default="evaluation", metavar="PATH",
                   help="report .json (one model and task) or folder (default: evaluation/)")
    p.add_argument("--cache", metavar="DIR", help="feature cache folder (default: next to the report)")
    p.add_argument("--folds", type=number(">= 2"), help="k-fold cross-validation over --train instead of --test (er: 5)")
    p.add_argument("--fold-by", dest="fold_by", choices=["speaker", "session"],
                   help="fold groups (er default: session column if present, else speaker)")
    p.add_argument("--device", help="extraction device (default: cuda if available)")
    p.add_argument("--seed", type=int, help="seed of heads, dev split and bootstrap (default 0)")
    p.add_argument("--epochs", type=number(">= 1"), help="max epochs of utterance heads (default 100)")
    p.add_argument("--asr-epochs", dest="asr_epochs", type=number(">= 1"), help="max epochs of the ASR head (default 40)")
    p.add_argument("--asr-hidden", dest="asr_hidden", type=number(">= 1"), help="BiLSTM units per direction (default 256)")
    p.add_argument("--lr", help="head learning rate: auto (default: the best of a small grid on the dev split, "
                   "reported) or a number")
    p.add_argument("--batch-size", dest="batch_size", type=number(">= 1"), help="utterance head batch size (default 32)")
    p.add_argument("--dev-fraction", dest="dev_fraction", type=number("(0, 1)", float),
                   help="share of train held out by speaker when there is no --dev (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_evaluate)
