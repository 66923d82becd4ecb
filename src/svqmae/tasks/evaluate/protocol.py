"""SUPERB-style evaluation of frozen features: ``svqmae evaluate``.

The protocol (SUPERB, Yang et al. 2021), with the upstream frozen:

- features of every layer are extracted once and cached on disk, keyed by upstream and file;
- a learnable softmax-weighted sum of all hidden layers (each standardized with training-set
  statistics) feeds a small head;
- utterance tasks (``classify``, ``ks``, ``er``): padding-aware mean pooling and one linear layer
  (the ``fbank-stats`` baseline pools by mean and standard deviation instead);
- ``asr``: a two-layer BiLSTM with CTC over characters, greedy decoding, WER and CER (jiwer);
- model selection on a dev set; without one, part of train is held out by speaker;
- the score comes with a 95% bootstrap interval over test items.

Mean pooling commutes with the layer sum, so utterance tasks cache one pooled vector per layer and
file (statistics pooling does not, but ``fbank-stats`` has one layer); ASR caches frame sequences
(float16).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ...config import ConfigError
from .features import FeatureStore
from .heads import fit_ctc_head, fit_utterance_head, transcribe
from .items import TASKS, Item, TaskSpec, _options, check_labels, load_items, log, make_folds, split_dev
from .report import bootstrap_ci, edit_counts, plot_report, report_path
from .upstreams import Upstream, get_upstream


def _stack_pooled(feats: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(feats)).float()


def _dev_for(train: list[Item], dev: list[Item] | None, o: dict):
    if dev is not None:
        return train, dev, "given"
    return split_dev(train, o["dev_fraction"], o["seed"])


def run_utterance(spec: TaskSpec, store: FeatureStore, train: list[Item], test: list[Item] | None,
                  dev: list[Item] | None, o: dict, srcs: dict) -> dict:
    labels = sorted({it.label for it in train})
    lab_index = {lab: i for i, lab in enumerate(labels)}
    folds = o["folds"] or (spec.default_folds if test is None else 0)
    if folds and test is not None:
        raise ConfigError("evaluate: give either a test set or --folds, not both")
    if test is None and not folds:
        raise ConfigError("evaluate: give a test set (--test) or --folds K for k-fold cross-validation")
    if folds:
        by = o["fold_by"] or spec.fold_by
        if by == "session" and not all(it.session for it in train):
            log("  no 'session' column: folds are speaker-wise")
            by = "speaker"
        fold_idx = make_folds(train, folds, by, o["seed"], srcs["train"])
        splits = [(f"fold {k + 1}", [i for j, f in enumerate(fold_idx) if j != k for i in f], idx)
                  for k, idx in enumerate(fold_idx)]
        pool = train
    else:
        check_labels(train, test, srcs["train"], srcs["test"])
        pool = train + test
        splits = [("test", list(range(len(train))), list(range(len(train), len(pool))))]
    if dev is not None:
        check_labels(train, dev, srcs["train"], srcs["dev"])
    feats = store.get(pool + (dev or []), "mean")
    X = _stack_pooled(feats[: len(pool)])
    Xdev_given = _stack_pooled(feats[len(pool):]) if dev else None
    y = torch.tensor([lab_index.get(it.label, -1) for it in pool])

    pos = {id(it): i for i, it in enumerate(pool)}
    truth, pred, weights, runs = [], [], [], []
    for name, tr_idx, te_idx in splits:
        tr_items = [pool[i] for i in tr_idx]
        if folds:
            check_labels(tr_items, [pool[i] for i in te_idx], f"{srcs['train']} without {name}",
                         f"{name} of {srcs['train']}")
        if dev is not None:
            fit_idx, Xdev, ydev, how = tr_idx, Xdev_given, torch.tensor([lab_index[it.label] for it in dev]), "given"
        else:
            fit_items, dev_items, how = split_dev(tr_items, o["dev_fraction"], o["seed"])
            fit_idx, dev_idx = [pos[id(it)] for it in fit_items], [pos[id(it)] for it in dev_items]
            Xdev, ydev = X[dev_idx], y[dev_idx]
        if o["progress"]:
            log(f"  {name}: training a linear head on {len(fit_idx)} items, selecting on {len(ydev)} ({how} dev split)")
        head, info = fit_utterance_head(X[fit_idx], y[fit_idx], Xdev, ydev, len(labels), spec.balanced, o)
        with torch.no_grad():
            p = head(X[te_idx]).argmax(-1)
        truth.append(y[te_idx])
        pred.append(p)
        weights.append(head.mix.weights().detach().numpy())
        runs.append({"split": name, "train": len(fit_idx), "dev": len(ydev), "dev_split": how,
                     "test": len(te_idx), "accuracy": round(float((p == y[te_idx]).float().mean()), 4), **info})
    truth_t, pred_t = torch.cat(truth).numpy(), torch.cat(pred).numpy()
    correct = (truth_t == pred_t).astype(np.float64)
    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(confusion, (truth_t, pred_t), 1)
    return {
        "metric": "accuracy", "value": round(float(correct.mean()), 4),
        "ci95": bootstrap_ci(correct, n_boot=o["bootstrap"], seed=o["seed"]),
        "n_test": int(len(correct)), "n_train": len(train), "labels": labels, "confusion": confusion.tolist(),
        "layer_weights": [round(float(w), 5) for w in np.mean(weights, 0)],
        "folds": folds or None, "runs": runs, "head_lr": [r["lr"] for r in runs],
    }


def _norm_text(t: str) -> str:
    return " ".join(t.split())


def run_ctc(store: FeatureStore, train: list[Item], test: list[Item] | None, dev: list[Item] | None,
            o: dict, srcs: dict) -> dict:
    if test is None:
        raise ConfigError("evaluate: task asr needs a test set (--test)")
    if o["folds"]:
        raise ConfigError("evaluate: --folds is for utterance tasks, not asr")
    fit, dev, how = _dev_for(train, dev, o)
    vocab = sorted({c for it in fit for c in _norm_text(it.text)})
    Ttr = [_norm_text(it.text) for it in fit]
    Tdev = [_norm_text(it.text) for it in dev]
    Tte = [_norm_text(it.text) for it in test]
    unseen = sorted({c for t in Tdev + Tte for c in t} - set(vocab))
    if unseen:  # they count as errors, but the user should know
        log(f"  note: dev/test characters never seen in training: {''.join(unseen[:40])}")
    Fall = store.get(fit + dev + test, "frames")
    Ftr, Fdev, Fte = Fall[: len(fit)], Fall[len(fit): len(fit) + len(dev)], Fall[len(fit) + len(dev):]
    if o["progress"]:
        log(f"  training a BiLSTM-CTC head on {len(fit)} utterances, selecting on {len(dev)} ({how} dev split)")
    head, info = fit_ctc_head(Ftr, Ttr, Fdev, Tdev, vocab, store.upstream.frame_rate, o)
    hyps = transcribe(head, Fte, vocab)
    import jiwer

    c_err, c_len = edit_counts(Tte, hyps, "char")
    w_err, w_len = edit_counts(Tte, hyps, "word")
    cer, wer = float(jiwer.cer(Tte, hyps)), float(jiwer.wer(Tte, hyps))
    return {
        "metric": "cer", "value": round(cer, 4),
        "ci95": bootstrap_ci(c_err, c_len, n_boot=o["bootstrap"], seed=o["seed"]),
        "n_test": len(test), "n_train": len(fit),
        "cer": round(cer, 4), "wer": round(wer, 4),
        "wer_ci95": bootstrap_ci(w_err, w_len, n_boot=o["bootstrap"], seed=o["seed"]),
        "vocab": "".join(vocab), "layer_weights": [round(float(w), 5) for w in head.mix.weights().detach()],
        "runs": [{"split": "test", "train": len(fit), "dev": len(dev), "dev_split": how, "test": len(test), **info}],
        "head_lr": [info["lr"]],
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(Tte, hyps))[:5]],
    }


# --------------------------------------------------------------------------- the API



def _default_cache(out: str | Path | None) -> Path:
    if out is not None:
        return report_path(out).parent / "features"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "svqmae" / "features"


def evaluate(model: str | Upstream, task: str, train: str, test: str | None = None, dev: str | None = None,
             out: str | None = None, **options) -> dict:
    """Evaluate frozen features of ``model`` on ``task`` the SUPERB way; returns the report.

    ``model``: an svqmae model/run folder, ``fbank``, ``fbank-stats``, ``random[:PRESET]`` or ``hf:PATH`` (or an
    :class:`~svqmae.tasks.evaluate.upstreams.Upstream` already loaded, to evaluate one model on several tasks).
    ``task``: ``classify`` / ``ks`` / ``er`` (label column) or ``asr`` (text column).
    ``out``: a ``.json`` path or a folder (then ``FOLDER/report.json``); plots go next to it.
    ``options``: see ``DEFAULTS`` (seed, epochs, lr, folds, fold_by, cache, device, ...).

    The report holds at least task, metric, value, ci95, n_test, upstream and layer_weights."""
    if task not in TASKS:
        raise ConfigError(f"evaluate: unknown task {task!r} (choose from {', '.join(TASKS)})")
    o = _options(options)
    spec = TASKS[task]
    t0 = time.monotonic()
    device = o["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    srcs = {"train": str(train), "test": str(test) if test else None, "dev": str(dev) if dev else None}
    train_items = load_items(train, task)
    test_items = load_items(test, task) if test else None
    dev_items = load_items(dev, task) if dev else None
    upstream = model if isinstance(model, Upstream) else get_upstream(model, device)
    if o["progress"]:
        log(f"evaluate {task} with {upstream.name} ({upstream.num_layers} layers x {upstream.dim}): "
            f"train {len(train_items)}" + (f", test {len(test_items)}" if test_items else "")
            + (f", dev {len(dev_items)}" if dev_items else ""))
    store = FeatureStore(Path(o["cache"]) if o["cache"] else _default_cache(out), upstream,
                         o["max_batch_seconds"], o["progress"])
    rng_state = torch.random.get_rng_state()
    try:
        if spec.kind == "utterance":
            result = run_utterance(spec, store, train_items, test_items, dev_items, o, srcs)
        else:
            result = run_ctc(store, train_items, test_items, dev_items, o, srcs)
    finally:
        torch.random.set_rng_state(rng_state)
    report = {
        "task": task, "model": getattr(upstream, "spec", upstream.name), **result, "upstream": upstream.describe(),
        "data": srcs, "features": {"extracted": store.extracted, "from_cache": store.cached, "cache": str(store.root)},
        "options": {k: o[k] for k in ("seed", "epochs", "patience", "lr", "batch_size", "dev_fraction")},
        "seconds": round(time.monotonic() - t0, 1),
    }
    if out is not None:
        path = report_path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        report["files"] = {"report": str(path), **plot_report(report, path)}
        path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if o["progress"]:
        lo, hi = report["ci95"]
        log(f"{task} {upstream.name}: {report['metric']} {100 * report['value']:.2f}% "
            f"[{100 * lo:.2f}, {100 * hi:.2f}] on {report['n_test']} test items (head lr "
            + ", ".join(f"{x:g}" for x in report["head_lr"]) + ")"
            + (f" -> {report['files']['report']}" if out else ""))
    return report
