"""Model folders and checkpoints on disk: a ``model/`` folder is all that is needed to load a model.

Layout (Hugging Face style): ``config.json`` (the resolved svqmae config), ``model.safetensors``
(weights; no pickled code anywhere), a ``README.md`` model card and the figures it shows. Training
checkpoints (``*.ckpt``) are read with ``torch.load(weights_only=True)``: tensors and plain data only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import config as C

FORMAT = "svqmae"


class CheckpointError(ValueError):
    """A path that is not a loadable svqmae model or checkpoint; the message names it and says why."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, cfg: C.Config, out_dir: str | Path, card: dict | None = None,
               figures: list[str | Path] | tuple = ()) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` into ``out_dir`` (atomically each).

    ``card``: facts for the model card (training data, steps, ...); ``figures``: image files (e.g. the
    training curves) copied next to the card and shown in it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for fig in map(Path, figures):
        if fig.is_file():
            if fig.resolve() != (out / fig.name).resolve():
                shutil.copyfile(fig, out / fig.name)
            names.append(fig.name)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".model.safetensors.tmp{os.getpid()}"
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / "model.safetensors")
    meta = {"format": FORMAT, "config": C.to_dict(cfg), "card": card or {}, "figures": names}
    atomic_write_bytes(out / "config.json", json.dumps(meta, indent=2).encode())
    atomic_write_bytes(out / "README.md", _model_card(cfg, card or {}, names).encode())
    return out


def _model_card(cfg: C.Config, card: dict, figures: list[str] = ()) -> str:
    e = cfg.model.encoder
    lines = [
        "---", "library_name: svqmae", "tags: [speech, self-supervised, svqmae]", "---", "",
        f"# SVQ-MAE encoder ({cfg.preset})", "",
        f"- encoder: {e.layers} layers, width {e.dim}, {e.heads} heads, FFN {e.ffn_dim}",
        f"- tokens: {cfg.model.features.n_mels}-bin log-mel x {cfg.model.features.stack} frames "
        f"({1000 // (cfg.model.features.stack * int(cfg.model.features.frame_shift_ms))} Hz)",
        f"- variant: {cfg.model.variant}, quantizer: {cfg.model.quantizer.kind} "
        f"(K={cfg.model.quantizer.codebook_size})",
    ]
    for k, v in card.items():
        lines.append(f"- {k}: {v}")
    if figures:
        lines += ["", "## Training curves", ""] + [f"![{name}]({name})" for name in figures]
    lines += ["", "```python", "import svqmae", "model = svqmae.load('PATH')",
              "hidden_states, lengths = model.extract(waves_16k, lengths)", "```", ""]
    return "\n".join(lines)


def one_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message for a one-line error: its first line, cut after the last whole sentence that
    fits in ``limit`` characters (else at a word, marked with '...'): never in the middle of a sentence."""
    text = str(e).strip()
    line = " ".join(text.splitlines()[0].split()) if text else e.__class__.__name__
    if len(line) <= limit:
        return line
    head = line[:limit]
    end = head.rfind(". ")
    return head[: end + 1] if end > 0 else head.rsplit(" ", 1)[0] + " ..."


def find_model(path: str | Path) -> Path:
    """A model folder, run DIR or checkpoint file -> the thing to load."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: model path not found")
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path
    if (path / "model" / "model.safetensors").is_file():
        return path / "model"
    ckpts = sorted((path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"{path}: not an svqmae model (no model.safetensors, model/ or checkpoints/)")


def read_checkpoint(p: str | Path) -> dict:
    """``torch.load(weights_only=True)`` of a training checkpoint that must hold an svqmae config."""
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p}: unreadable checkpoint ({one_line(e)})") from None
    if not isinstance(ckpt, dict) or "svqmae_config" not in ckpt:
        raise CheckpointError(f"{p}: not an svqmae checkpoint")
    return ckpt


def read_meta(folder: Path) -> dict:
    """``folder/config.json`` of a model folder, checked to be svqmae's."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable ({e.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{folder / 'config.json'}: not an svqmae config (format={fmt!r})")
    return meta


def load_config(path: str | Path) -> C.Config:
    """The resolved config of a model folder, run DIR or checkpoint."""
    p = find_model(path)
    if p.is_file():
        return C.from_dict(read_checkpoint(p)["svqmae_config"], str(p))
    return C.from_dict(read_meta(p)["config"], str(p / "config.json"))


@dataclass
class SavedModel:
    """What :func:`read_model` found: the config, the weights (decoder included if saved), where they
    came from, and the model card and figures of a folder."""

    config: C.Config
    state: dict
    where: Path
    card: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)


def read_model(path: str | Path) -> SavedModel:
    """Config and weights of a ``model/`` folder, a run DIR or a ``.ckpt`` (no model is built here)."""
    p = find_model(path)
    if p.is_file():
        ckpt = read_checkpoint(p)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
        return SavedModel(C.from_dict(ckpt["svqmae_config"], str(p)), state, p)
    meta = read_meta(p)
    cfg = C.from_dict(meta["config"], str(p / "config.json"))
    where = p / "model.safetensors"
    try:
        state = load_file(str(where))
    except Exception as e:
        raise CheckpointError(f"{where}: unreadable weights ({one_line(e)})") from None
    figures = [p / name for name in meta.get("figures", []) if (p / name).is_file()]
    return SavedModel(cfg, state, where, meta.get("card", {}), figures)
