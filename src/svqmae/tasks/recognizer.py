"""A fine-tuned recognizer on disk: ``DIR/model/`` holds ``config.json`` + ``model.safetensors`` (so
``svqmae.load`` reads it as the fine-tuned encoder; the CTC head's weights ride along), ``ctc.json``
(fine-tuning config, backbone and units; written last, so its presence means the folder is complete)
and ``units.txt`` / ``units.model``. No pickled code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import config as C
from ..data.text import load_units
from ..model.ctc import CTCModel
from ..model.io import CheckpointError, one_line, save_model

CTC_FORMAT = "svqmae-ctc"


@dataclass
class Recognizer:
    """A loaded fine-tuned model: ``model`` (eval mode), its ``units`` and where it came from."""

    model: CTCModel
    units: object
    cfg: C.FinetuneConfig
    path: Path


def save_recognizer(model: CTCModel, units, cfg: C.FinetuneConfig, out: Path, card: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pcfg = C.Config(preset=cfg.preset, model=cfg.model, train=cfg.train)
    save_model(model, pcfg, out, {"task": f"CTC speech recognition ({units.kind} units, {len(units)} outputs)",
                                  "backbone": model.backbone, **card})
    units_file = units.save(out)
    meta = {"format": CTC_FORMAT, "backbone": model.backbone, "vocab_size": len(units),
            "units": {"kind": units.kind, "file": units_file, "lowercase": units.lowercase},
            "finetune": C.to_dict(cfg), "card": card}
    tmp = out / ".ctc.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    tmp.replace(out / "ctc.json")  # written last: its presence means the folder is complete
    return out


def finetune_config_from_dict(d: dict, source: str) -> C.FinetuneConfig:
    cfg = C.FinetuneConfig()
    C.apply_saved(cfg, d, source)
    C.validate_finetune(cfg, source)
    return cfg


def load_recognizer(path: str | Path, device: str | torch.device = "cpu") -> Recognizer:
    """A fine-tuned model: its ``model/`` folder or the fine-tuning run DIR."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: model path not found")
    if (p / "model" / "ctc.json").is_file():
        p = p / "model"
    meta_file = p / "ctc.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{p}: not a fine-tuned svqmae recognizer (no ctc.json; "
                              "make one with `svqmae finetune`)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable ({e.__class__.__name__})") from None
    if meta.get("format") != CTC_FORMAT:
        raise CheckpointError(f"{meta_file}: not an svqmae recognizer (format={meta.get('format')!r})")
    cfg = finetune_config_from_dict(meta["finetune"], str(meta_file))
    try:
        units = load_units(p, meta["units"]["kind"], meta["units"].get("lowercase", True))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = CTCModel(cfg, len(units), meta.get("backbone", "svqmae"))
    try:
        state = load_file(str(p / "model.safetensors"))
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"{p / 'model.safetensors'}: weights do not match ctc.json ({one_line(e)})") from None
    return Recognizer(model.to(device).eval(), units, cfg, p)
