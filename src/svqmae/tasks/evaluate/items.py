"""The evaluation protocol's data side: tasks and options, labelled items read strictly from a source,
dev splits by speaker, k-fold groups by speaker or session, and label checks."""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ...config import ConfigError
from ...data import DataError, cut_path, load_source


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tasks and options


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "utterance" | "ctc"
    metric: str
    balanced: bool = False  # class-balanced loss (SUPERB KS samples classes evenly)
    default_folds: int = 0  # k-fold cross-validation when no test set is given
    fold_by: str = "speaker"


TASKS = {
    "classify": TaskSpec("utterance", "accuracy"),
    "ks": TaskSpec("utterance", "accuracy", balanced=True),
    "er": TaskSpec("utterance", "accuracy", default_folds=5, fold_by="session"),
    "asr": TaskSpec("ctc", "cer"),
}

DEFAULTS = dict(
    seed=0,  # head initialization, batch order, dev split and bootstrap
    epochs=100,  # utterance heads: at most this many epochs, early-stopped on dev accuracy
    patience=10,
    lr="auto",  # head learning rate: "auto" picks it on the dev split from heads.LR_GRID, or a number
    batch_size=32,
    dev_fraction=0.1,  # share of train held out (by speaker) when no dev set is given
    folds=None,  # k-fold cross-validation over train, grouped by fold_by (instead of a test set)
    fold_by=None,  # "speaker" or "session" (a ``session`` column of the manifest)
    cache=None,  # feature cache folder (default: OUT_DIR/features, else ~/.cache/svqmae/features)
    device=None,  # extraction device (default: cuda when available)
    bootstrap=1000,  # bootstrap resamples for the 95% interval
    asr_hidden=256,  # BiLSTM units per direction
    asr_epochs=40,
    asr_patience=6,
    asr_batch_size=16,
    max_batch_seconds=60.0,  # audio per extraction batch
    progress=True,
)


def _options(options: dict) -> dict:
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"evaluate: unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(DEFAULTS)})")
    o = dict(DEFAULTS)
    o.update({k: v for k, v in options.items() if v is not None})
    if o["lr"] != "auto":
        try:
            o["lr"] = float(o["lr"])
        except (TypeError, ValueError):
            raise ConfigError(f"evaluate: lr must be 'auto' or a number, got {o['lr']!r}") from None
        if o["lr"] <= 0:
            raise ConfigError(f"evaluate: lr must be positive, got {o['lr']}")
    return o


# --------------------------------------------------------------------------- data


@dataclass
class Item:
    cut: object
    path: str
    label: str | None
    text: str | None
    speaker: str | None
    session: str | None = None
    key: str = field(default="")  # cache key of the audio segment


def _file_key(cut) -> str:
    p = Path(cut_path(cut)).resolve()
    st = p.stat()
    ident = f"{p}|{st.st_size}|{st.st_mtime_ns}|{cut.start:.4f}|{cut.duration:.4f}"
    return hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()


def _session_column(src: Path) -> dict[str, str]:
    """path -> ``session`` from a TSV/CSV manifest's optional ``session`` column (SUPERB ER folds)."""
    if not src.is_file() or src.suffix.lower() not in (".tsv", ".csv", ".txt"):
        return {}
    text = src.read_text(encoding="utf-8-sig")
    delim = "\t" if "\t" in text.splitlines()[0] else ","
    rows = csv.DictReader(text.splitlines(), delimiter=delim)
    return {r["path"].strip(): r["session"] for r in rows if r.get("session") and r.get("path")}


def load_items(src: str | Path, task: str) -> list[Item]:
    """Read a source strictly (an unreadable file is an error naming it) and check what the task needs."""
    spec = TASKS[task]
    cuts = load_source(src)
    sessions = _session_column(Path(src))
    items = []
    for cut in cuts:
        sup = cut.supervisions[0] if cut.supervisions else None
        custom = (sup.custom or {}) if sup is not None else {}
        item = Item(cut=cut, path=cut_path(cut), label=custom.get("label"),
                    text=(sup.text or "").strip() or None if sup is not None else None,
                    speaker=sup.speaker if sup is not None else None, session=sessions.get(cut.id))
        if spec.kind == "utterance" and item.label is None:
            raise DataError(f"{item.path}: no label (task {task} needs a 'label' column in {src})")
        if spec.kind == "ctc" and not item.text:
            raise DataError(f"{item.path}: no transcript (task asr needs a 'text' column in {src})")
        item.key = _file_key(cut)
        items.append(item)
    return items


def _rank(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")


def split_dev(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item], str]:
    """Hold out about ``fraction`` of ``items`` for model selection: whole speakers when there are at
    least two, random items otherwise (and for items without a speaker). -> (train, dev, how)."""
    speakers = sorted({it.speaker for it in items if it.speaker}, key=lambda s: _rank(seed, s))
    with_spk = [it for it in items if it.speaker]
    held: set[str] = set()
    how = "random"
    if len(speakers) >= 2:
        how = "speaker"
        count = {s: 0 for s in speakers}
        for it in with_spk:
            count[it.speaker] += 1
        total = 0
        for s in speakers[:-1]:  # keep at least one speaker for training
            if total >= fraction * len(with_spk):
                break
            held.add(s)
            total += count[s]
    dev_ids = {id(it) for it in with_spk if it.speaker in held}
    random_pool = [it for it in items if not it.speaker or how == "random"]
    # ranked by where each segment sits below the items' common folder, not by its absolute path or file
    # times: the same data copied elsewhere (or made again) gets the same dev split
    where = {id(it): os.path.abspath(it.path) for it in random_pool}
    root = os.path.commonpath([os.path.dirname(w) for w in where.values()]) if where else ""
    random_pool.sort(key=lambda it: _rank(seed, f"{os.path.relpath(where[id(it)], root)}|{it.cut.start:.4f}"))
    dev_ids |= {id(it) for it in random_pool[: int(round(fraction * len(random_pool)))]}
    train = [it for it in items if id(it) not in dev_ids]
    dev = [it for it in items if id(it) in dev_ids]
    if not dev or not train:
        raise DataError(f"{items[0].path}: too few items ({len(items)}) to hold out a dev set; give --dev")
    return train, dev, how


def make_folds(items: list[Item], k: int, by: str, seed: int, src: str) -> list[list[int]]:
    """Indices of ``items`` in ``k`` folds; each group (speaker or session) lies in one fold.
    Groups are dealt largest first into the emptiest fold, in a seeded order."""
    def group(it: Item) -> str:
        g = it.session if by == "session" else it.speaker
        if not g:
            raise DataError(f"{it.path}: no {by} for {by}-wise folds (add a '{by}' column to {src})")
        return g

    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(group(it), []).append(i)
    if len(groups) < k:
        raise DataError(f"{src}: {k} folds need at least {k} {by}s, found {len(groups)}")
    order = sorted(groups, key=lambda g: (-len(groups[g]), _rank(seed, g)))
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        min(folds, key=len).extend(groups[g])
    return folds


def check_labels(train: list[Item], test: list[Item], train_src: str, test_src: str) -> None:
    known = {it.label for it in train}
    missing = sorted({it.label for it in test} - known)
    if missing:
        raise DataError(
            f"{test_src}: label(s) {', '.join(map(repr, missing))} do not occur in the training data {train_src} "
            f"(it has {', '.join(sorted(known))})"
        )
