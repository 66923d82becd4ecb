"""Where commands write: one guard for every ``--out``, called before any work starts.

- :func:`output_folder` (runs, features, reports, Shar directories, model folders, corpora) and
  :func:`output_file` (ONNX graphs, transcripts, score reports) refuse, in one line naming the path:
  an ``--out`` that is a file where a folder is meant (or the reverse), a path that cannot be created
  (a file on the way, a read-only file system, no permission), and an output that already holds
  another kind of output (a pre-training run given to ``extract``, a manifest given to ``transcribe
  --out``): writing there would mix the two or overwrite what is there.
- Rerunning into an output of the same kind passes: resuming a run, continuing a Shar directory,
  reusing the demo corpus stay as they were. What a rerun does not write again is removed once the
  new results are complete (:func:`sweep`), so nothing stale stays beside them.

Kinds are recognised by the files each writes (no marker is added to anyone's folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..config import ConfigError


class OutputError(ConfigError):
    """An ``--out`` that cannot take this command's output; the message names the path and says why."""


# kind -> what it is, in words
KINDS = {
    "pretrain": "a pre-training run",
    "finetune": "a fine-tuning run",
    "model": "a saved model",
    "extract": "extracted features",
    "evaluate": "evaluation reports",
    "shar": "a Shar directory",
    "hf": "a transformers model folder",
    "demo": "a demo run",
    "corpus": "the demo corpus",
    "manifests": "prepared manifests",
    "downloads": "downloaded corpora",
    "onnx": "an ONNX graph",
    "transcripts": "transcripts",
    "score": "a score report",
    "cache": "a feature cache",
    "check": "a data check report",
}


def _config_keys(path: Path) -> set[str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def folder_kind(folder: Path) -> str | None:
    """The kind of svqmae output ``folder`` holds (see :data:`KINDS`), or None (empty, or anything else)."""

    def has(name: str) -> bool:
        return (folder / name).exists()

    if has("corpus") and has("pretrain"):
        return "demo"
    if has("corpus.json") and has("pretrain.tsv"):
        return "corpus"
    if has("units.txt") or has("units.model") or has("ctc.json"):
        return "finetune"
    keys = _config_keys(folder / "config.yaml")
    if {"model", "train"} <= keys or has("checkpoints"):
        return "finetune" if "ctc" in keys else "pretrain"
    if has("preprocessor_config.json"):
        return "hf"
    if has("model.safetensors"):
        return "model"
    if has("features.json") or has("index.tsv"):
        return "extract"
    if has("shar_index.json") or any(folder.glob("cuts.*.jsonl.gz")):
        return "shar"
    if has("report.json") or has("results.md"):
        return "evaluate"
    if any(folder.glob("*_cuts.jsonl.gz")):
        return "manifests"
    return None


def file_kind(path: Path) -> str | None:
    """The kind of svqmae output file ``path`` is (``onnx``, ``transcripts``, ``score``), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if not head:
        return None
    if len(head) > 1 and head[0] == 0x08 and head[1] < 0x20:  # an ONNX ModelProto opens with its ir_version (field 1, small)
        return "onnx"
    text = head.decode("utf-8", errors="replace")
    if text.startswith("path\tseconds\ttext\n"):
        return "transcripts"
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and "cer" in data and "wer" in data:
            return "score"
        if isinstance(data, dict) and "task" in data and "metric" in data:
            return "evaluate"
        if isinstance(data, list) and all(isinstance(r, dict) and {"source", "problems"} <= set(r) for r in data):
            return "check"
        if isinstance(data, list) and all(isinstance(r, dict) and {"path", "text"} <= set(r) for r in data):
            return "transcripts"
    return None


def _unwritable(path: Path, flag: str) -> str | None:
    """Why ``path`` (a folder or file to create or overwrite) cannot be written, or None."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        return f"{path}: {flag} cannot be created: {probe} is a file"
    folder = probe if probe.is_dir() else probe.parent
    if not os.access(folder, os.W_OK | os.X_OK) or (probe.is_file() and not os.access(probe, os.W_OK)):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        return f"{path}: {flag} {why}"
    return None


def output_folder(out: str | Path, kind: str, flag: str = "--out") -> Path:
    """Check the folder ``out`` for an output of ``kind`` (see the module docstring) and return it; creates
    nothing (a command that then fails on its input leaves no trace). Raises :class:`OutputError`."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: {flag} is an existing file; give a folder")
    why = _unwritable(p, flag)
    if why:
        raise OutputError(why)
    if p.is_dir():
        held = folder_kind(p)
        if held is not None and held != kind:
            raise OutputError(f"{p}: {flag} already holds {KINDS[held]}; {KINDS[kind]} would be mixed into it, "
                              f"give another folder")
    return p


def output_file(out: str | Path, kind: str, flag: str = "--out", suffixes: Iterable[str] = ()) -> Path:
    """Check the file ``out`` for an output of ``kind``: not a folder, creatable, and if it exists, an
    output of the same kind (so that nothing else is overwritten); ``suffixes``: the accepted endings.
    Returns it; creates nothing."""
    p = Path(out)
    suffixes = tuple(suffixes)
    if p.is_dir():
        raise OutputError(f"{p}: {flag} is a folder; give a file name")
    if suffixes and p.suffix.lower() not in suffixes:
        raise OutputError(f"{p}: {flag} must end in {' or '.join(suffixes)}")
    if p.exists() and not p.is_file():
        raise OutputError(f"{p}: {flag} exists and is not a regular file")
    why = _unwritable(p, flag)
    if why:
        raise OutputError(why)
    if p.is_file() and p.stat().st_size and file_kind(p) != kind:
        raise OutputError(f"{p}: {flag} is an existing file that is not {KINDS[kind]}; it would be overwritten, "
                          f"give another name")
    return p


def sweep(folder: Path, written: Iterable[Path], pattern: str) -> int:
    """Remove the files under ``folder`` matching ``pattern`` (recursively) that this run did not write
    (``written``: their paths): what an earlier, larger run left. Returns how many were removed."""
    keep = {Path(p).resolve() for p in written}
    removed = 0
    for f in sorted(folder.rglob(pattern)):
        if f.is_file() and f.resolve() not in keep:
            f.unlink()
            removed += 1
    for d in sorted((d for d in folder.rglob("*") if d.is_dir()), reverse=True):  # emptied subfolders
        if not any(d.iterdir()):
            d.rmdir()
    return removed
