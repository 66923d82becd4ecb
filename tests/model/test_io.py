"""Hugging Face-style save/load, ``svqmae extract`` and the ONNX export (svqmae.tasks.extract, svqmae.tasks.export)."""

import json

import pytest
import torch

from svqmae import config as C
from svqmae.model import SVQMAE, CheckpointError
from tests.conftest import extract_no_grad, tiny_model, waves_batch

# Durations of 0.1 s x an odd number keep each utterance's last token clear of its end, where the
# filterbank would see the batch's zero padding instead of lhotse's edge reflection: with them, an
# utterance's features do not depend on what it is batched with.
SECONDS = (0.5, 0.7, 0.9, 1.1, 1.3)


def test_save_pretrained_layout_card_and_identical_round_trip(model_dir, tmp_path):
    path, model = model_dir
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "README.md", "pretrain.png"}
    card = (path / "README.md").read_text()
    assert "/data/fsdd" in card and "steps: 30" in card and "final training loss: 5.1" in card
    assert "![pretrain.png](pretrain.png)" in card
    assert json.loads((path / "config.json").read_text())["config"]["model"]["encoder"]["dim"] == 64

    waves, lengths = waves_batch()
    ref, ref_len = extract_no_grad(model, waves, lengths)
    loaded = SVQMAE.from_pretrained(path)
    assert not loaded.training and not loaded.has_decoder
    # from the model folder, from the run DIR above it, and saved again (card and figure travel along)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "pretrain.png").is_file()
    assert "/data/fsdd" in (tmp_path / "again" / "README.md").read_text()
    for where in (path, path.parent, tmp_path / "again"):
        out, out_len = extract_no_grad(SVQMAE.from_pretrained(where), waves, lengths)
        assert torch.equal(out_len, ref_len)
        assert len(out) == 4 and all(torch.equal(a, b) for a, b in zip(out, ref))  # level, embedding, 2 blocks


def test_from_pretrained_reads_a_training_checkpoint(tmp_path):
    model, cfg = tiny_model(seed=2)
    ckpt = tmp_path / "run" / "checkpoints" / "step=10.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"svqmae_config": C.to_dict(cfg), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               ckpt)
    waves, lengths = waves_batch()
    ref = extract_no_grad(model, waves, lengths)[0]
    for where in (ckpt, tmp_path / "run"):
        out = extract_no_grad(SVQMAE.from_pretrained(where), waves, lengths)[0]
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    with pytest.raises(CheckpointError, match="not found"):
        SVQMAE.from_pretrained(tmp_path / "nope")
