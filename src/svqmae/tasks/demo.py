"""``svqmae demo --out DIR [--quick]`` (what ``make demo`` runs): the whole method end to end on a
machine with no data.

1. Synthesize the demo corpus with eSpeak NG (:mod:`svqmae.synth`) into ``DIR/corpus``.
2. Pre-train a tiny SVQ-MAE on its train split, unlabeled (``DIR/pretrain``).
3. Evaluate keyword spotting (12 classes) and speaking style (4 classes) of unseen voices from the
   frozen features, against two filterbank baselines: SUPERB's (frames mean-pooled) and the same
   with statistics pooling (mean and standard deviation; :func:`svqmae.evaluate.evaluate`). Each
   task has at least 400 test utterances, so each score's 95% interval is within about +-5 points.
4. Print a table; write ``DIR/results.md``, ``DIR/results.json`` and plots in ``DIR/plots``.

The full demo takes 6 to 12 minutes on 2 CPU cores (pre-training stops after 7 minutes or 1,500
steps); ``--quick`` (a smaller corpus and model, a few steps) takes about a minute and only shows
that everything runs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DemoSettings:
    minutes: float  # of synthetic audio
    test_items: int  # at least this many test utterances per task (svqmae.data.synth)
    overrides: tuple[str, ...]  # on top of the tiny preset
    eval_options: dict


FULL = DemoSettings(
    minutes=30.0,
    test_items=400,  # a 95% interval of at most about +-5 points
    overrides=("train.max_minutes=7", "train.max_steps=1500", "train.warmup_steps=60", "train.max_batch_seconds=60",
               "train.max_utt_seconds=6", "train.val_every=100", "train.log_every=10"),
    eval_options={},
)
QUICK = DemoSettings(
    minutes=1.5,
    test_items=0,
    overrides=("model.encoder.layers=2", "model.encoder.dim=64", "model.encoder.heads=2", "model.encoder.ffn_dim=128",
               "model.decoder.layers=1", "model.decoder.dim=64", "model.decoder.heads=2", "model.decoder.ffn_dim=128",
               "model.quantizer.codebook_size=64", "train.max_steps=10", "train.warmup_steps=2",
               "train.max_batch_seconds=16", "train.max_utt_seconds=4", "train.val_items=4", "train.val_every=10",
               "train.log_every=2", "train.num_workers=0", "train.ckpt_every_steps=10"),
    eval_options={"epochs": 10, "patience": 3, "bootstrap": 100},
)

TASKS = (  # (evaluate task, corpus folder, what the table calls it)
    ("ks", "keywords", "keyword spotting (12 classes)"),
    ("classify", "styles", "speaking style (4 classes)"),
)
BASELINES = (  # (evaluate model, its column in the table)
    ("fbank", "filterbanks, mean-pooled (SUPERB)"),
    ("fbank-stats", "filterbanks, mean+std pooled"),
)


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, overrides: tuple[str, ...] = ()) -> dict:
    """``overrides``: ``key=value`` settings on top of the demo's own (e.g. to try a model option on
    the demo, or ``train.max_minutes=1e9`` for a step budget that does not depend on the machine's load)."""
    from .. import config as C
    from ..data.synth import synthesize
    from ..engine.plots import read_metrics
    from .outputs import output_folder
    from .pretrain import pretrain

    output_folder(out, "demo")
    s = QUICK if quick else FULL
    # resolved first: a bad --set fails before minutes of synthesis, not after
    cfg = C.resolve("tiny", overrides=[*s.overrides, f"train.seed={seed}", *overrides])
    out = Path(out)
    t0 = time.monotonic()
    _log(f"== 1/3 demo corpus ({s.minutes:g} min of synthetic speech to pre-train on, and its test sets)")
    corpus_info = synthesize(out / "corpus", minutes=s.minutes, seed=seed, log=_log, test_items=s.test_items)
    corpus = out / "corpus"

    _log("== 2/3 pre-training a tiny SVQ-MAE on the unlabeled train split")
    run = out / "pretrain"
    model_dir = pretrain([str(corpus / "pretrain.tsv")], run, cfg)
    metrics = read_metrics(run)
    train_rows = [r for r in metrics if r.get("loss") is not None]

    results: list[dict] = []
    if importlib.util.find_spec("svqmae.evaluate") is None:
        _log("(svqmae.evaluate is not installed: reporting pre-training metrics only)")
    else:
        from .evaluate import evaluate

        _log("== 3/3 evaluating frozen features on unseen voices: SVQ-MAE vs filterbanks")
        for task, folder, title in TASKS:
            for model, tag in (*((m, m) for m, _ in BASELINES), (str(model_dir), "svqmae")):
                rep = evaluate(model=model, task=task, train=str(corpus / folder / "train.tsv"),
                               test=str(corpus / folder / "test.tsv"), out=str(out / "eval" / f"{folder}_{tag}.json"),
                               seed=seed, **s.eval_options)
                results.append({"task": title, "model": tag, "metric": rep["metric"], "value": rep["value"],
                                "ci95": rep.get("ci95"), "n_test": rep.get("n_test"),
                                "upstream": rep["upstream"]["name"] if isinstance(rep["upstream"], dict)
                                else str(rep["upstream"])})

    summary = {
        "quick": quick, "seed": seed, "overrides": list(overrides),
        "minutes_of_audio": round(corpus_info["hours"] * 60, 1),
        "pretrain_minutes_of_audio": round(_pretrain_minutes(corpus_info), 1),
        "pretrain": _pretrain_summary(train_rows, metrics), "results": results,
        "seconds": round(time.monotonic() - t0, 1), "model": str(model_dir),
    }
    table = results_table(summary)
    print(table)
    (out / "results.md").write_text(table + "\n")
    summary["plots"] = [str(p) for p in _plots(out, run, train_rows, results)]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nplots: {', '.join(summary['plots'])}\nmodel: {model_dir} (load with svqmae.load)")
    return summary


def _pretrain_minutes(corpus_info: dict) -> float:
    """Minutes of audio in the corpus' train splits (what pre-training sees)."""
    return sum(t["train"]["minutes"] for t in corpus_info["tasks"].values())


def _pretrain_summary(rows: list[dict], metrics: list[dict]) -> dict:
    if not rows:
        return {}
    first, last = rows[0], rows[-1]
    val = [r for r in metrics if "val_masked_acc" in r]
    return {
        "steps": last["step"], "minutes": round(last.get("elapsed_s", 0) / 60, 1),
        "loss": [first["loss"], last["loss"]], "masked_acc": [first["masked_acc"], last["masked_acc"]],
        "code_usage": last.get("code_usage"), "val_masked_acc": val[-1]["val_masked_acc"] if val else None,
    }


def results_table(summary: dict) -> str:
    p = summary["pretrain"]
    lines = [f"SVQ-MAE demo: pre-trained on {summary['pretrain_minutes_of_audio']} min of synthetic speech; tested on voices "
             "unseen in training" + (" (--quick: a smoke test, numbers mean nothing)" if summary["quick"] else ""), ""]
    if p:
        lines.append(f"pre-training: {p['steps']} steps in {p['minutes']} min; loss {p['loss'][0]:.2f} -> "
                     f"{p['loss'][1]:.2f}; masked code accuracy {p['masked_acc'][0]:.3f} -> {p['masked_acc'][1]:.3f}"
                     + (f" (validation {p['val_masked_acc']:.3f})" if p.get("val_masked_acc") is not None else "")
                     + (f"; codebook usage {p['code_usage']:.2f}" if p.get("code_usage") is not None else ""))
        lines.append("")
    if summary["results"]:
        by_task: dict[str, dict[str, dict]] = {}
        for r in summary["results"]:
            by_task.setdefault(r["task"], {})[r["model"]] = r
        columns = [*BASELINES, ("svqmae", "SVQ-MAE (frozen)")]
        lines += ["| task | test items | " + " | ".join(title for _, title in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for task, m in by_task.items():
            n = next(iter(m.values()))["n_test"]
            lines.append(f"| {task} | {n} | " + " | ".join(_fmt(m.get(tag)) for tag, _ in columns) + " |")
        lines += ["", "accuracy % [95% bootstrap interval over test items]; frozen features, linear probe"]
    else:
        lines.append("(no downstream evaluation: svqmae.evaluate is not available)")
    return "\n".join(lines)


def _fmt(r: dict | None) -> str:
    if r is None:
        return "-"
    ci = r.get("ci95")
    return f"{100 * r['value']:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _plots(out: Path, run: Path, rows: list[dict], results: list[dict]) -> list[Path]:
    """Loss/accuracy curves (from the run), codebook usage, and the results as bars."""
    from ..engine.plots import plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    made = []
    curves = run / "plots" / "pretrain.png"
    if curves.is_file():
        shutil.copyfile(curves, plots / "pretrain_curves.png")
        made.append(plots / "pretrain_curves.png")
    usage = [(r["step"], r["code_usage"], r.get("code_perplexity")) for r in rows if r.get("code_usage") is not None]
    if usage:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([u[0] for u in usage], [u[1] for u in usage], label="share of codes used (batch)")
        ax.set(xlabel="step", ylabel="codebook usage", ylim=(0, 1.05), title="quantizer codebook usage")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(plots / "codebook_usage.png", dpi=100)
        plt.close(fig)
        made.append(plots / "codebook_usage.png")
    if results:
        tasks = list(dict.fromkeys(r["task"] for r in results))
        fig, ax = plt.subplots(figsize=(8, 3.8))
        columns = [*BASELINES, ("svqmae", "SVQ-MAE (frozen)")]
        width = 0.8 / len(columns)
        for k, ((model, label), color) in enumerate(zip(columns, ("tab:gray", "tab:olive", "tab:blue"))):
            got = [next((r for r in results if r["task"] == t and r["model"] == model), None) for t in tasks]
            vals = [100 * r["value"] if r else 0 for r in got]
            err = [[v - 100 * r["ci95"][0] if r else 0 for v, r in zip(vals, got)],
                   [100 * r["ci95"][1] - v if r else 0 for v, r in zip(vals, got)]]
            ax.bar([i + width * k for i in range(len(tasks))], vals, width=width, color=color, label=label,
                   yerr=err, capsize=3)
        ax.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(tasks))], tasks)
        ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="unseen voices, frozen features + linear head")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots / "results.png", dpi=100)
        plt.close(fig)
        made.append(plots / "results.png")
    return made


def cmd_demo(args) -> None:
    run_demo(args.out, quick=args.quick, seed=args.seed, overrides=tuple(args.set))


def add_cli(sub) -> None:
    from ..engine.args import add_set_arg

    p = sub.add_parser("demo", help="synthesize a corpus, pre-train a tiny model, evaluate it (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="everything goes here (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a smoke test in under a minute (tiny corpus and model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, the pre-training and the probes")
    add_set_arg(p, "override a pre-training setting on top of the demo's (repeatable)")
    p.set_defaults(func=cmd_demo)
