"""Saving and loading models: a ``model/`` folder is all that is needed.

Layout (Hugging Face style): ``config.json`` (the resolved svqmae config), ``model.safetensors``
(weights; no pickled code anywhere), a ``README.md`` model card and the figures it shows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import config as C
from .audio import resample
from .model import SVQMAE

FORMAT = "svqmae"


class CheckpointError(ValueError):
    """A path that is not a loadable svqmae model; the message names it and says why."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(model: SVQMAE, cfg: C.Config, out_dir: str | Path, card: dict | None = None,
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


def _find(path: Path) -> Path:
    """A model folder, run DIR or checkpoint file -> the thing to load."""
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


def load_config(path: str | Path) -> C.Config:
    p = _find(Path(path))
    if p.is_file():
        return C.from_dict(_read_ckpt(p)["svqmae_config"], str(p))
    try:
        meta = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p / 'config.json'}: unreadable ({e.__class__.__name__})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p / 'config.json'}: not an svqmae config (format={meta.get('format')!r})")
    return C.from_dict(meta["config"], str(p / "config.json"))


def _read_ckpt(p: Path) -> dict:
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p}: unreadable checkpoint ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or "svqmae_config" not in ckpt:
        raise CheckpointError(f"{p}: not an svqmae checkpoint")
    return ckpt


def load(path: str | Path, with_decoder: bool = False, device: str | torch.device = "cpu") -> SVQMAE:
    """Load a pre-trained model (a ``model/`` folder, a run DIR or a ``.ckpt``), in eval mode.

    By default the decoder is dropped and the encoder is returned; ``model.extract(waves, lengths)``
    gives every layer's hidden states."""
    p = _find(Path(path))
    cfg = load_config(p)
    model = SVQMAE(cfg.model)
    if p.is_file():
        state = {k.removeprefix("model."): v for k, v in _read_ckpt(p)["state_dict"].items()}
        where = p
    else:
        where = p / "model.safetensors"
        try:
            state = load_file(str(where))
        except Exception as e:
            raise CheckpointError(f"{where}: unreadable weights ({str(e)[:160]})") from None
    if not with_decoder:
        model.drop_decoder()
        own = model.state_dict().keys()
        state = {k: v for k, v in state.items() if k in own}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the config (missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]})"
        )
    model.config = cfg
    if not p.is_file():  # keep the card and figures, so that save_pretrained() round-trips them
        meta = json.loads((p / "config.json").read_text())
        model.card = meta.get("card", {})
        model.figures = [p / name for name in meta.get("figures", []) if (p / name).is_file()]
    return model.to(device).eval()


@torch.no_grad()
def extract_audio(
    model: SVQMAE, waves: list[np.ndarray | torch.Tensor], sample_rate: int = 16000
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states for a list of 1-D waveforms at any sample rate (resampled to the model's)."""
    target = model.cfg.features.sample_rate
    xs = [torch.as_tensor(resample(np.asarray(w, dtype=np.float32), sample_rate, target)) for w in waves]
    lengths = torch.tensor([len(x) for x in xs])
    batch = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
    device = next(model.parameters()).device
    return model.extract(batch.to(device), lengths.to(device))
