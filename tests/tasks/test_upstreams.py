"""Upstreams: one interface for svqmae models, fbank, random init and local Hugging Face encoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svqmae import config as C
from svqmae.model import SVQMAE, CheckpointError, save_model
from svqmae.tasks.evaluate.upstreams import get_upstream
from tests.conftest import harmonic_tone


def _batch():
    a = torch.from_numpy(harmonic_tone(1.0, f0=150, seed=1))
    b = torch.from_numpy(harmonic_tone(0.5, f0=250, seed=2))
    waves = torch.zeros(2, len(a))
    waves[0], waves[1, : len(b)] = a, b
    return waves, torch.tensor([len(a), len(b)])


def _check_padding_aware(up):
    """Shapes are (L, B, T, D), and the short utterance's frames do not depend on the padding after it."""
    waves, lengths = _batch()
    hidden, frames = up(waves, lengths)
    assert hidden.shape[:2] == (up.num_layers, 2) and hidden.shape[3] == up.dim
    assert frames[1] < frames[0] <= hidden.shape[2]
    assert abs(int(frames[0]) - up.frame_rate) <= 2  # one second of audio
    alone, n_alone = up(waves[1:, : lengths[1]], lengths[1:])
    n = int(frames[1])
    assert int(n_alone[0]) == n
    torch.testing.assert_close(hidden[:, 1, :n], alone[:, 0, :n], atol=1e-4, rtol=1e-4)


def test_fbank_is_one_layer_of_240_dims_at_100_hz():
    up = get_upstream("fbank")
    assert (up.num_layers, up.dim, up.frame_rate) == (1, 240, 100.0)
    _check_padding_aware(up)


def test_fbank_stats_has_the_fbank_frames_and_pools_their_mean_and_std():
    fb, st = get_upstream("fbank"), get_upstream("fbank-stats")
    waves, lengths = _batch()
    torch.testing.assert_close(st(waves, lengths), fb(waves, lengths))  # ASR sees the same frames
    assert st.key != fb.key  # pooled features are cached apart
    assert (st.describe()["pooling"], fb.describe()["pooling"]) == ("mean+std", "mean")
    frames = torch.randn(1, 9, 240, generator=torch.Generator().manual_seed(0)) * 3 + 1
    ref = frames[0].numpy()
    pooled = st.pool(frames)
    assert pooled.shape == (1, 480)
    np.testing.assert_allclose(pooled[0, :240].numpy(), ref.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled[0, 240:].numpy(), ref.std(0), rtol=1e-5, atol=1e-5)  # population std
    torch.testing.assert_close(fb.pool(frames), pooled[:, :240])
    assert st.pool(frames[:, :1]).abs()[0, 240:].max() == 0  # one frame has no spread


def test_random_upstream_is_seeded_untrained_svqmae():
    a, b, c = get_upstream("random"), get_upstream("random:tiny"), get_upstream("random:tiny:1")
    tiny = C.resolve("tiny").model.encoder
    assert (a.num_layers, a.dim) == (1 + tiny.layers + 1, tiny.dim)  # level, input embedding, blocks
    assert a.key == b.key != c.key  # same seed, same weights; another seed, another cache key
    _check_padding_aware(a)
    waves, lengths = _batch()
    torch.testing.assert_close(a(waves, lengths)[0], b(waves, lengths)[0])


def test_svqmae_model_folder(tmp_path):
    cfg = C.resolve("tiny", overrides=["model.encoder.layers=2", "model.encoder.dim=64", "model.encoder.heads=2",
                                       "model.encoder.ffn_dim=128", "model.decoder.layers=1"])
    torch.manual_seed(0)
    save_model(SVQMAE(cfg.model), cfg, tmp_path / "run" / "model")
    up = get_upstream(str(tmp_path / "run"))  # a run DIR finds its model/
    assert (up.num_layers, up.dim, up.frame_rate) == (4, 64, 25.0) and up.describe()["state0"] == "level"
    assert up.key == get_upstream(str(tmp_path / "run" / "model")).key
    _check_padding_aware(up)


def test_cache_key_tells_the_level_state_apart(tmp_path):
    """The same weights with and without the level state extract different states: different cache keys."""
    keys = {}
    for on in (True, False):
        cfg = C.resolve("tiny", overrides=["model.encoder.layers=1", "model.encoder.dim=64", "model.encoder.heads=2",
                                           "model.encoder.ffn_dim=128", f"model.features.level_state={on}"])
        torch.manual_seed(0)
        save_model(SVQMAE(cfg.model), cfg, tmp_path / str(on))
        up = get_upstream(str(tmp_path / str(on)))
        keys[on] = up.key
        assert up.num_layers == 2 + on and up.describe()["state0"] == ("level" if on else "input embedding")
    assert keys[True] != keys[False]


def tiny_wav2vec2(path, norm: str = "layer"):
    """A tiny randomly initialized wav2vec 2.0 encoder saved as a local HF folder (no downloads).
    ``norm="group"`` is the BASE-style front end, used without attention masks."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(10, 8), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, feat_extract_norm=norm)
    Wav2Vec2Model(cfg).save_pretrained(path)
    return path


def test_hf_upstream_loads_a_local_wav2vec2_folder(tmp_path):
    up = get_upstream(f"hf:{tiny_wav2vec2(tmp_path / 'w2v')}")
    assert (up.num_layers, up.dim, up.frame_rate) == (3, 32, 200.0)
    _check_padding_aware(up)


def test_bad_model_names_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        get_upstream(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        get_upstream(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(C.ConfigError, match="seed"):
        get_upstream("random:tiny:x")

