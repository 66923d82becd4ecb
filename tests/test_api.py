import pytest
import torch

import svqmae
from svqmae.model import SVQMAE, CheckpointError, load_config, save_model
from tests.conftest import harmonic_tone
from tests.model.test_svqmae import tiny_cfg


def test_save_load_round_trip_gives_identical_features(tmp_path):
    cfg = tiny_cfg()
    model = SVQMAE(cfg.model).eval()
    save_model(model, cfg, tmp_path / "model", {"steps": 0})
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"config.json", "model.safetensors", "README.md"}
    loaded = svqmae.load(tmp_path / "model")
    assert not loaded.has_decoder and not loaded.training
    assert load_config(tmp_path / "model") == cfg
    x = torch.from_numpy(harmonic_tone(1.0)).unsqueeze(0)
    with torch.no_grad():
        a, _ = model.extract(x)
        b, _ = loaded.extract(x)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # a run DIR holding model/ loads too, and so does the class method
    assert svqmae.SVQMAE.from_pretrained(tmp_path).cfg == cfg.model
    full = svqmae.load(tmp_path / "model", with_decoder=True)
    assert full.has_decoder


def test_extract_audio_resamples_any_rate(tmp_path):
    model = SVQMAE(tiny_cfg().model).drop_decoder().eval()
    hs, lengths = svqmae.extract_audio(model, [harmonic_tone(1.0, sr=8000), harmonic_tone(0.5, sr=44100)], 8000)
    # the 44.1 kHz clip is treated as 8 kHz (the caller said so): 22050 samples -> 44100 at 16 kHz -> 69 tokens
    assert lengths.tolist() == [25, 69]
    assert len(hs) == 4 and hs[0].shape[:2] == (2, 69)  # level, input embedding, 2 blocks


def test_bad_model_paths_give_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nothere: model path not found"):
        svqmae.load(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an svqmae model"):
        svqmae.load(tmp_path / "empty")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt: unreadable checkpoint"):
        svqmae.load(junk)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="other.ckpt: not an svqmae checkpoint"):
        svqmae.load(other)
    cfg = tiny_cfg()
    save_model(SVQMAE(cfg.model), cfg, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"format": "wav2vec2"}')
    with pytest.raises(CheckpointError, match="not an svqmae config"):
        svqmae.load(tmp_path / "m")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    cfg = tiny_cfg()
    save_model(SVQMAE(cfg.model), cfg, tmp_path / "m")
    bigger = tiny_cfg("model.encoder.layers=3")
    import json

    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["model"]["encoder"]["layers"] = bigger.model.encoder.layers
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the config"):
        svqmae.load(tmp_path / "m")
