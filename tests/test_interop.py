"""Hugging Face-style save/load, ``svqmae extract`` and the ONNX export (svqmae.interop)."""

import csv
import json

import numpy as np
import pytest
import torch

from svqmae import config as C
from svqmae.api import CheckpointError, save_model
from svqmae.audio import read_audio
from svqmae.cli import main
from svqmae.interop import MatmulLogFilterBank, check_onnx, export_onnx, parse_layers
from svqmae.model import SVQMAE
from tests.conftest import harmonic_tone, tiny_model, write_wav

# Durations of 0.1 s x an odd number keep each utterance's last token clear of its end, where the
# filterbank would see the batch's zero padding instead of lhotse's edge reflection: with them, an
# utterance's features do not depend on what it is batched with.
SECONDS = (0.5, 0.7, 0.9, 1.1, 1.3)


def _waves(seconds=(1.0, 0.7), seed=0):
    xs = [torch.from_numpy(harmonic_tone(s, f0=110 + 40 * i, seed=seed + i)) for i, s in enumerate(seconds)]
    lengths = torch.tensor([len(x) for x in xs])
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True), lengths


def _extract(model, waves, lengths):
    with torch.no_grad():
        return model.extract(waves, lengths)


@pytest.fixture
def model_dir(tmp_path):
    model, cfg = tiny_model(seed=1)
    fig = tmp_path / "plots" / "pretrain.png"
    fig.parent.mkdir()
    fig.write_bytes(b"\x89PNG\r\n\x1a\n")  # any image file: save_pretrained copies it next to the card
    # as svqmae pretrain saves its model
    save_model(model, cfg, tmp_path / "run" / "model",
               card={"training data": "/data/fsdd", "steps": 30, "final training loss": "5.1"}, figures=[fig])
    return tmp_path / "run" / "model", model


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0,-1", 3) == [0, 2]
    with pytest.raises(C.ConfigError, match="out of range"):
        parse_layers("3", 3)
    with pytest.raises(C.ConfigError, match="comma-separated"):
        parse_layers("last", 3)


def test_save_pretrained_layout_card_and_identical_round_trip(model_dir, tmp_path):
    path, model = model_dir
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "README.md", "pretrain.png"}
    card = (path / "README.md").read_text()
    assert "/data/fsdd" in card and "steps: 30" in card and "final training loss: 5.1" in card
    assert "![pretrain.png](pretrain.png)" in card
    assert json.loads((path / "config.json").read_text())["config"]["model"]["encoder"]["dim"] == 64

    waves, lengths = _waves()
    ref, ref_len = _extract(model, waves, lengths)
    loaded = SVQMAE.from_pretrained(path)
    assert not loaded.training and not loaded.has_decoder
    # from the model folder, from the run DIR above it, and saved again (card and figure travel along)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "pretrain.png").is_file()
    assert "/data/fsdd" in (tmp_path / "again" / "README.md").read_text()
    for where in (path, path.parent, tmp_path / "again"):
        out, out_len = _extract(SVQMAE.from_pretrained(where), waves, lengths)
        assert torch.equal(out_len, ref_len)
        assert len(out) == 3 and all(torch.equal(a, b) for a, b in zip(out, ref))


def test_from_pretrained_reads_a_training_checkpoint(tmp_path):
    model, cfg = tiny_model(seed=2)
    ckpt = tmp_path / "run" / "checkpoints" / "step=10.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"svqmae_config": C.to_dict(cfg), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
               ckpt)
    waves, lengths = _waves()
    ref = _extract(model, waves, lengths)[0]
    for where in (ckpt, tmp_path / "run"):
        out = _extract(SVQMAE.from_pretrained(where), waves, lengths)[0]
        assert all(torch.equal(a, b) for a, b in zip(out, ref))
    with pytest.raises(CheckpointError, match="not found"):
        SVQMAE.from_pretrained(tmp_path / "nope")


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
    assert meta["layers"] == [0, 1, 2] and meta["dim"] == 64 and meta["downsample_rate"] == 640
    for row in rows:
        x = read_audio(row["path"])
        feats = np.load(out / row["file"])
        tokens = (len(x) + 80) // 160 // 4
        assert feats.shape == (3, tokens, 64) and int(row["tokens"]) == tokens and feats.dtype == np.float32
        alone = _extract(model, torch.from_numpy(x)[None], torch.tensor([len(x)]))[0]
        np.testing.assert_allclose(feats, torch.stack(alone)[:, 0].numpy(), atol=1e-5)
    assert {r["file"].split("/")[1] for r in rows} == {"spk_a", "spk_b"}  # sub-folders kept

    # selected layers, one npz per utterance
    out2 = tmp_path / "feats2"
    assert main(["extract", "--model", str(path), "--data", str(folder), "--out", str(out2), "--layers", "0,-1",
                 "--format", "npz", "--workers", "0", "--quiet"]) == 0
    for row in csv.DictReader(open(out2 / "index.tsv"), delimiter="\t"):
        with np.load(out2 / row["file"]) as z:
            assert sorted(z.files) == ["layer_0", "layer_2"]
            ref = np.load(out / row["file"].replace(".npz", ".npy"))
            np.testing.assert_allclose(z["layer_2"], ref[2], atol=1e-5)


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


def test_dft_filterbank_matches_lhotse():
    model, _ = tiny_model()
    waves, _ = _waves((1.0, 0.63))
    fbank = model.frontend.fbank
    ref = fbank(waves)
    np.testing.assert_allclose(MatmulLogFilterBank(fbank)(waves).numpy(), ref.numpy(), atol=3e-4)


def test_onnx_export_matches_pytorch_with_dynamic_batch_and_length(tmp_path):
    import onnxruntime as ort

    model, _ = tiny_model(seed=3)
    path = export_onnx(model, tmp_path / "encoder.onnx")
    assert model.has_decoder, "export leaves the model untouched"
    assert check_onnx(model, path) < 1e-4  # a batch of 2 different lengths, padded
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["waves", "lengths"]
    # another batch size and length than at export time; padding handled through `lengths`
    waves, lengths = _waves((0.45, 1.37, 0.8), seed=5)
    hidden, tok_len = sess.run(None, {"waves": waves.numpy(), "lengths": lengths.numpy()})
    ref, ref_len = _extract(model, waves, lengths)
    assert hidden.shape == (3, 3, int(ref_len.max()), 64)
    assert tok_len.tolist() == ref_len.tolist()
    assert np.abs(hidden - torch.stack(ref).numpy()).max() < 1e-4
