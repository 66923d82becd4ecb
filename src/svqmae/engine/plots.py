"""Plots written next to runs and reports (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_pretrain(run_dir: str | Path) -> Path:
    """Loss, masked accuracy and codebook usage curves -> ``run_dir/plots/pretrain.png``."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    s = [r["step"] for r in train]
    ax[0].plot(s, [r["loss"] for r in train], label="train")
    if val:
        ax[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax[0].set(title="loss", xlabel="step")
    ax[0].legend()
    ax[1].plot(s, [r["masked_acc"] for r in train], label="train")
    if val:
        ax[1].plot([r["step"] for r in val], [r["val_masked_acc"] for r in val], "o-", label="validation")
    ax[1].set(title="masked code accuracy", xlabel="step")
    ax[1].legend()
    ax[2].plot(s, [r["code_perplexity"] for r in train])
    ax[2].set(title="code perplexity (batch)", xlabel="step")
    fig.tight_layout()
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    fig.savefig(out / "pretrain.png", dpi=100)
    plt.close(fig)
    return out / "pretrain.png"
