"""Features out of svqmae: ``svqmae extract``.

``svqmae extract --model M --data SRC --out DIR [--layers all|i,j] [--format npy|npz]``
    Hidden states for every utterance of a source (folder, TSV/CSV or lhotse manifest), in
    duration-sorted batches, one file per utterance plus ``DIR/index.tsv``:

    - ``--format npy``: ``DIR/features/<id>.npy``, float32 ``(L, T, D)``: the selected layers, stacked.
    - ``--format npz``: ``DIR/features/<id>.npz`` with one ``(T, D)`` float32 array per selected
      layer, named ``layer_<i>``.

    The states are those of ``model.extract``: the input embedding, then the output of each encoder
    block (the last one final-normed); with ``model.features.level_state`` (the default since it was
    added) the utterance's level comes first (:meth:`svqmae.model.SVQMAE.level_to_state`), so that layer 0
    is the level and layer i + 1 block i. ``-1`` is always the top block.
    ``T`` is the utterance's real token count (padding is cut off), ``downsample_rate`` samples each.
    ``index.tsv`` has one row per utterance: ``id file path seconds tokens`` (``file``: the features,
    relative to DIR; ``path``: the audio) + ``label text speaker`` when the source has them;
    ``DIR/features.json`` records the model, layers, width and frame rate.
"""

from __future__ import annotations

import csv
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import config as C
from ..data import Problems, WaveformBatches, cut_fields, cut_path, load_sources
from ..engine.args import number
from ..model import SVQMAE
from .outputs import output_folder, sweep

# --------------------------------------------------------------------------- layer selection


def parse_layers(spec: str, num_states: int) -> list[int]:
    """``all`` or comma-separated indices into the hidden states (negative counts from the end)."""
    if spec.strip().lower() == "all":
        return list(range(num_states))
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise C.ConfigError(f"--layers {spec!r}: expected 'all' or comma-separated integers") from None
        if not -num_states <= i < num_states:
            raise C.ConfigError(
                f"--layers {spec!r}: layer {i} out of range (the model has hidden states 0..{num_states - 1})"
            )
        out.append(i % num_states)
    return out


# --------------------------------------------------------------------------- extract

_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


def _feature_name(cut_id: str, taken: set[str]) -> str:
    """A cut id -> a unique, safe relative file stem (subfolders kept, no absolute paths or '..')."""
    parts = [p for p in _UNSAFE.sub("_", cut_id).split("/") if p not in ("", ".", "..")]
    stem = "/".join(parts) or "utt"
    name, n = stem, 1
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return name


def _save_features(path: Path, states: list[np.ndarray], layers: list[int], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(path, np.stack(states))
    else:
        np.savez(path, **{f"layer_{i}": s for i, s in zip(layers, states)})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def extract_features(
    model_path: str | Path,
    sources: list[str | Path],
    out_dir: str | Path,
    layers: str = "all",
    fmt: str = "npy",
    batch_seconds: float = 60.0,
    device: str = "auto",
    num_workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write per-utterance features and ``index.tsv`` into ``out_dir``; returns the index path.

    Utterances are sorted by duration and batched up to ``batch_seconds`` of audio, so padding is
    small; unreadable files are skipped and listed in ``out_dir/skipped_files.tsv``. Rerun into the same
    folder, it holds this run's features only (an earlier run's other files are removed at the end)."""
    from lhotse.dataset import DynamicCutSampler
    from tqdm import tqdm

    if fmt not in ("npy", "npz"):
        raise C.ConfigError(f"--format {fmt!r}: expected npy or npz")
    out = output_folder(out_dir, "extract")
    dev = _device(device)
    model = SVQMAE.from_pretrained(model_path, device=dev)
    num_states = model.num_states
    chosen = parse_layers(layers, num_states)
    problems = Problems()
    cuts = load_sources(list(sources), problems).sort_by_duration(ascending=False)
    feat_dir = out / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    (out / "features.json").write_text(json.dumps({
        "model": str(model_path), "format": fmt, "layers": chosen, "dim": model.cfg.encoder.dim,
        "downsample_rate": model.downsample_rate, "sample_rate": model.cfg.features.sample_rate,
        "frame_rate_hz": model.cfg.features.sample_rate / model.downsample_rate,
        "layout": "(L, T, D) per .npy" if fmt == "npy" else "one (T, D) array 'layer_<i>' per layer in each .npz",
    }, indent=2))

    with warnings.catch_warnings():  # lhotse suggests lazy CutSets; ours are small and already in memory
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet")
        sampler = DynamicCutSampler(cuts, max_duration=batch_seconds, shuffle=False)
    loader = torch.utils.data.DataLoader(
        WaveformBatches(sample_rate=model.cfg.features.sample_rate), sampler=sampler, batch_size=None,
        num_workers=num_workers, prefetch_factor=2 if num_workers else None,
    )
    by_id = {c.id: c for c in cuts}
    extra = [k for k in ("label", "text", "speaker") if any(cut_fields(c)[k] for c in cuts)]
    taken: set[str] = set()
    written: list[Path] = []
    index = out / "index.tsv"
    start, audio_s = time.monotonic(), 0.0
    bar = tqdm(total=len(cuts), unit="utt", desc="extract", disable=not progress, dynamic_ncols=True)
    with open(index, "w", newline="") as f, torch.inference_mode():
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "file", "path", "seconds", "tokens", *extra])
        for batch in loader:
            for path, reason in batch["failed"]:
                problems.add(path, reason)
            bar.update(len(batch["failed"]))
            if not batch["ids"]:
                continue
            hidden, tok_len = model.extract(batch["waves"].to(dev), batch["lengths"].to(dev))
            sel = torch.stack([hidden[i] for i in chosen], dim=1).float().cpu().numpy()  # (B, L, T, D)
            for b, cut_id in enumerate(batch["ids"]):
                n = int(tok_len[b])
                rel = f"features/{_feature_name(cut_id, taken)}.{fmt}"
                _save_features(out / rel, list(sel[b, :, :n]), chosen, fmt)
                written.append(out / rel)
                fields = cut_fields(by_id[cut_id])
                seconds = int(batch["lengths"][b]) / model.cfg.features.sample_rate
                w.writerow([cut_id, rel, cut_path(by_id[cut_id]), f"{seconds:.3f}", n, *(fields[k] for k in extra)])
                audio_s += seconds
            bar.update(len(batch["ids"]))
            bar.set_postfix_str(f"{audio_s / max(time.monotonic() - start, 1e-9):.1f} audio-s/s")
    bar.close()
    sweep(feat_dir, written, "*.np[yz]")  # an earlier run's features of utterances not in this one
    skipped = out / "skipped_files.tsv"
    skipped.unlink(missing_ok=True)
    if len(problems):
        with open(skipped, "w") as f:
            f.write("path\treason\n")
            f.writelines(f"{p}\t{r}\n" for p, r in problems.items)
    return index


def cmd_extract(args) -> None:
    index = extract_features(args.model, args.data, args.out, args.layers, args.format, args.batch_seconds,
                             args.device, args.workers, progress=not args.quiet)
    rows = sum(1 for _ in open(index)) - 1
    skipped = Path(args.out) / "skipped_files.tsv"
    note = f"; {sum(1 for _ in open(skipped)) - 1} unreadable files skipped (see {skipped})" if skipped.exists() else ""
    print(f"extract: {rows} utterances -> {Path(args.out) / 'features'}, index {index}{note}")


def add_cli(sub) -> None:
    p = sub.add_parser("extract", help="hidden states of every utterance of a source, one file each plus an index")
    p.add_argument("--model", required=True, metavar="M", help="model/ folder, run DIR or .ckpt")
    p.add_argument("--data", action="append", required=True, metavar="SRC",
                   help="folder of audio, TSV/CSV manifest or lhotse manifest (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder: features/, index.tsv and features.json")
    p.add_argument("--layers", default="all", help="'all' (default) or comma-separated indices of model.extract's "
                   "states (0 = the level, or the input embedding in models without it; -1 = the top block), e.g. 6,-1")
    p.add_argument("--format", choices=["npy", "npz"], default="npy",
                   help="npy: one (L,T,D) array per utterance; npz: one (T,D) array per layer per utterance")
    p.add_argument("--batch-seconds", type=number("> 0", float), default=60.0,
                   help="audio seconds per batch (default 60)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=number(">= 0"), default=1, help="audio loading processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)
