"""Hugging Face-style save/load, ``svqmae extract`` and the ONNX export (svqmae.tasks.extract, svqmae.tasks.export)."""

import csv
import json

import numpy as np
import pytest
import torch

from svqmae import config as C
from svqmae.cli import main
from svqmae.data.audio import read_audio
from svqmae.tasks.extract import parse_layers
from tests.conftest import extract_no_grad, harmonic_tone, write_wav

# Durations of 0.1 s x an odd number keep each utterance's last token clear of its end, where the
# filterbank would see the batch's zero padding instead of lhotse's edge reflection: with them, an
# utterance's features do not depend on what it is batched with.
SECONDS = (0.5, 0.7, 0.9, 1.1, 1.3)


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0,-1", 3) == [0, 2]
    with pytest.raises(C.ConfigError, match="out of range"):
        parse_layers("3", 3)
    with pytest.raises(C.ConfigError, match="comma-separated"):
        parse_layers("last", 3)


def _audio_folder(root):
    folder = root / "audio"
    for i, s in enumerate(SECONDS):
        sub = "spk_a" if i % 2 else "spk_b"
        write_wav(folder / sub / f"utt {i}.wav", harmonic_tone(s, f0=100 + 30 * i, seed=i))
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    return folder


def test_extract_writes_one_file_per_utterance_and_an_index(model_dir, tmp_path, capsys):
    path, model = model_dir
    folder = _audio_folder(tmp_path)
    out = tmp_path / "feats"
    assert main(["extract", "--model", str(path), "--data", str(folder), "--out", str(out),
                 "--batch-seconds", "2", "--workers", "0", "--quiet"]) == 0
    assert "5 utterances" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "index.tsv"), delimiter="\t"))
    assert len(rows) == len(SECONDS)
    assert "broken.wav" in (out / "skipped_files.tsv").read_text()
    meta = json.loads((out / "features.json").read_text())
    assert meta["layers"] == [0, 1, 2, 3] and meta["dim"] == 64 and meta["downsample_rate"] == 640
    for row in rows:
        x = read_audio(row["path"])
        feats = np.load(out / row["file"])
        tokens = (len(x) + 80) // 160 // 4
        assert feats.shape == (4, tokens, 64) and int(row["tokens"]) == tokens and feats.dtype == np.float32
        alone = extract_no_grad(model, torch.from_numpy(x)[None], torch.tensor([len(x)]))[0]
        np.testing.assert_allclose(feats, torch.stack(alone)[:, 0].numpy(), atol=1e-5)
    assert {r["file"].split("/")[1] for r in rows} == {"spk_a", "spk_b"}  # sub-folders kept

    # selected layers, one npz per utterance
    out2 = tmp_path / "feats2"
    assert main(["extract", "--model", str(path), "--data", str(folder), "--out", str(out2), "--layers", "0,-1",
                 "--format", "npz", "--workers", "0", "--quiet"]) == 0
    for row in csv.DictReader(open(out2 / "index.tsv"), delimiter="\t"):
        with np.load(out2 / row["file"]) as z:
            assert sorted(z.files) == ["layer_0", "layer_3"]  # the level and the top block
            ref = np.load(out / row["file"].replace(".npz", ".npy"))
            np.testing.assert_allclose(z["layer_3"], ref[3], atol=1e-5)


def test_extract_bad_inputs_are_one_line_errors(model_dir, tmp_path, capsys):
    path, _ = model_dir
    folder = _audio_folder(tmp_path)
    for args, needle in (
        (["--model", str(tmp_path / "missing"), "--data", str(folder)], "missing: model path not found"),
        (["--model", str(path), "--data", str(tmp_path / "nodata")], "nodata: data source not found"),
        (["--model", str(path), "--data", str(folder), "--layers", "7"], "layer 7 out of range"),
    ):
        assert main(["extract", *args, "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
