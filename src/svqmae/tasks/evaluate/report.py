"""Scores and reports: bootstrap intervals, edit counts, plots of layer weights and confusions, and the
markdown table of several models and tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bootstrap_ci(num: np.ndarray, den: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of sum(num)/sum(den) (or mean(num)) over test items resampled with replacement."""
    num = np.asarray(num, dtype=np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    stats = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def edit_counts(refs: list[str], hyps: list[str], unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance (errors, reference length) in characters or words."""
    import jiwer

    proc = jiwer.process_characters if unit == "char" else jiwer.process_words
    errs, lens = [], []
    for r, h in zip(refs, hyps):
        o = proc(r, h)
        errs.append(o.substitutions + o.deletions + o.insertions)
        lens.append(o.substitutions + o.deletions + o.hits)
    return np.array(errs), np.array(lens)


# --------------------------------------------------------------------------- running a task



def report_path(out: str | Path) -> Path:
    p = Path(out)
    return p if p.suffix == ".json" else p / "report.json"


def plot_report(report: dict, json_path: Path) -> dict:
    """``STEM_layers.png`` (layer weights) and, for classification, ``STEM_confusion.png`` next to the report."""
    from ...engine.plots import plt

    files = {}
    w = report["layer_weights"]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(w) + 2), 3))
    ax.bar(range(len(w)), w, color="tab:blue")
    first = report["upstream"].get("state0", "input embedding")
    ax.set(xlabel=f"hidden state (0 = {first})", ylabel="softmax weight", xticks=range(len(w)),
           title=f"{report['task']}: layer weights of {report['upstream']['name']}")
    fig.tight_layout()
    files["layers_png"] = str(json_path.with_name(f"{json_path.stem}_layers.png"))
    fig.savefig(files["layers_png"], dpi=100)
    plt.close(fig)
    if "confusion" in report:
        labels, cm = report["labels"], np.array(report["confusion"], dtype=float)
        rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        n = len(labels)
        fig, ax = plt.subplots(figsize=(min(3 + 0.45 * n, 20), min(2.5 + 0.45 * n, 20)))
        im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0, fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if rows[i, j] > 0.5 else "black")
        ax.set(xlabel="predicted", ylabel="true",
               title=f"{report['task']} {report['upstream']['name']}: accuracy {100 * report['value']:.1f}%")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        files["confusion_png"] = str(json_path.with_name(f"{json_path.stem}_confusion.png"))
        fig.savefig(files["confusion_png"], dpi=100)
        plt.close(fig)
    else:  # an earlier classification report's, rerun into the same place: stale beside this one
        json_path.with_name(f"{json_path.stem}_confusion.png").unlink(missing_ok=True)
    return files


def _cell(r: dict) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown_table(reports: list[dict]) -> str:
    """Models as rows, tasks as columns; accuracy or CER in %, with the 95% bootstrap interval."""
    tasks = list(dict.fromkeys((r["task"], r["metric"]) for r in reports))
    models = list(dict.fromkeys(r["model"] for r in reports))
    cell = {(r["model"], r["task"], r["metric"]): _cell(r) for r in reports}
    lines = ["| model | " + " | ".join(f"{t} {m} % [95% CI]" for t, m in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(cell.get((m, t, k), "-") for t, k in tasks) + " |")
    return "\n".join(lines)
