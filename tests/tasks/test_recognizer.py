"""CTC fine-tuning, transcription and scoring on a tiny model and a synthetic spelled-letters set."""

from __future__ import annotations

import pytest
import torch

from svqmae.config import resolve_finetune
from svqmae.data.text import build_units
from svqmae.model import CheckpointError
from svqmae.model.ctc import CTCModel
from svqmae.tasks.recognizer import load_recognizer, save_recognizer
from tests.conftest import FINETUNE_FAST, TINY_MODEL_OVERRIDES

TINY, FAST = TINY_MODEL_OVERRIDES, FINETUNE_FAST


def test_recognizer_round_trip_for_both_backbones(tmp_path):
    units = build_units("char", ["abc d"])
    for backbone in ("svqmae", "lstm"):
        cfg = resolve_finetune("tiny", overrides=TINY + ["ctc.upsample=2", "ctc.lstm_layers=1"])
        torch.manual_seed(0)
        model = CTCModel(cfg, len(units), backbone).eval()
        waves, lengths = torch.randn(2, 16000), torch.tensor([16000, 8000])
        lp, frames = model(waves, lengths)
        assert lp.shape == (2, 50, len(units)) and frames.tolist() == [50, 24]
        assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 50), atol=1e-4)
        save_recognizer(model, units, cfg, tmp_path / backbone, {})
        rec = load_recognizer(tmp_path / backbone)
        assert rec.model.backbone == backbone and torch.allclose(rec.model(waves, lengths)[0], lp, atol=1e-5)
    (tmp_path / "svqmae" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_recognizer(tmp_path / "svqmae")
