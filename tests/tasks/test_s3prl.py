"""svqmae against s3prl's upstream contract (s3prl itself is not installed: it needs torchaudio)."""

import argparse
import math
import pickle
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.nn.utils.rnn import pad_sequence

from svqmae.model import CheckpointError, save_model
from svqmae.tasks.s3prl import UpstreamExpert, add_cli, install, patch_s3prl, svqmae_local
from tests.conftest import harmonic_tone, tiny_model

LENGTHS = (16000, 11111, 23456)  # samples, deliberately not multiples of the 640-sample hop


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, cfg = tiny_model(seed=4)
    return save_model(model, cfg, tmp_path_factory.mktemp("run") / "model")


def _wavs():
    return [torch.from_numpy(harmonic_tone(n / 16000, f0=120 + 40 * i, seed=i)) for i, n in enumerate(LENGTHS)]


def test_forward_contract(model_dir):
    up = svqmae_local(ckpt=str(model_dir), model_config=None, refresh=False)  # as s3prl's runner calls it
    assert isinstance(up, torch.nn.Module) and not up.training
    rate = up.get_downsample_rates("hidden_states")
    assert isinstance(rate, int) and rate == 640
    with torch.no_grad():
        out = up(_wavs())
    hs = out["hidden_states"]
    assert isinstance(hs, list) and len(hs) == 4  # level, input embedding, 2 layers, for s3prl's weighted sum
    T = math.ceil(max(LENGTHS) / 640)  # the frames s3prl counts for the longest utterance
    assert all(h.shape == (3, T, 64) for h in hs)
    assert out["last_hidden_state"] is hs[-1]
    # each row holds its own utterance's states: extract()'s tokens, then the last token repeated up to
    # s3prl's ceil(len / 640) frames, then zeros
    model = up.model
    for i, w in enumerate(_wavs()):
        with torch.no_grad():
            alone, tok = model.extract(w[None], torch.tensor([len(w)]))
        n, t = math.ceil(len(w) / 640), int(tok[0])
        assert t == (len(w) + 80) // 640 and n - t in (0, 1)  # 11,111 and 23,456 samples: one frame more
        for h, a in zip(hs, alone):
            assert torch.allclose(h[i, :t], a[0, :t], atol=1e-5)
            assert torch.equal(h[i, t:n], h[i, t - 1 : t].expand(n - t, -1))
            assert (h[i, n:] == 0).all()
    assert sum(math.ceil(n / 640) > (n + 80) // 640 for n in LENGTHS) >= 2  # the repeat is exercised


# --------------------------------------------------------------------------- s3prl's length rules (0.4.18)
# s3prl is not installed here (it needs torchaudio); these follow its source line by line.


def _s3prl_upstream(up, wavs):
    """``s3prl.nn.upstream.S3PRLUpstream.forward``: (hidden states, valid frames per row) per layer."""
    wavs_len = torch.tensor([len(w) for w in wavs])
    padded = pad_sequence(wavs, batch_first=True)
    original_wavs_len = wavs_len
    if max(original_wavs_len) < 0.05 * 16000:  # MIN_SECOND * SAMPLE_RATE: zero-pad very short batches
        padded_samples = int(0.05 * 16000) - max(original_wavs_len)
        padded = torch.cat((padded, padded.new_zeros(padded.size(0), padded_samples)), dim=1)
        wavs_len = wavs_len + padded_samples
    hidden_states = up([w[:n] for w, n in zip(padded, wavs_len)])["hidden_states"]
    stride, max_wav_len, out = up.get_downsample_rates("hidden_states"), int(max(wavs_len)), []
    for h in hidden_states:
        expected = len(range(0, max_wav_len, stride))
        if h.size(1) > expected:  # _match_length
            assert h.size(1) // expected == 1
            h = h[:, :expected]
        elif h.size(1) < expected:
            assert expected // h.size(1) == 1
            h = torch.cat((h, h[:, -1:].repeat(1, expected - h.size(1), 1)), dim=1)
        h_len = torch.div(original_wavs_len - 1, stride, rounding_mode="floor") + 1
        out.append((h[:, : max(h_len)], h_len))
    return out


def _s3prl_runner_features(up, wavs):
    """``s3prl.upstream.interfaces.Featurizer.tolist`` on every layer (the runner's ``run_downstream.py``
    path): the rows it hands the downstream, ``f[:round(len / rate)]``."""
    rate = up.get_downsample_rates("hidden_states")
    out = []
    for h in up(wavs)["hidden_states"]:
        feature_len = [round(len(w) / rate) for w in wavs]
        assert abs(h.size(1) - round(max(len(w) for w in wavs) / rate)) < 5  # TOLERABLE_SEQLEN_DIFF
        out.append([f[:n] for f, n in zip(h, feature_len)])
    return out


def test_rows_are_the_same_alone_and_in_a_batch_under_s3prls_length_rules(model_dir):
    """41,280 samples = 64.5 hops: S3PRLUpstream counts 65 frames where svqmae's frame rule gives 64 tokens;
    in a batch beside a longer utterance the 65th row must not be padding (it was: up to 11 apart).
    54,880 = 85.75 hops: the runner's Featurizer keeps round() = 86 frames of svqmae's 85 tokens; beside
    the longer 60,000 it got a padding row that it did not get alone."""
    up = UpstreamExpert(str(model_dir))
    lengths = (41280, 54880, 11111, 60000)
    wavs = [torch.from_numpy(harmonic_tone(n / 16000, f0=110 + 50 * i, seed=7 + i)) for i, n in enumerate(lengths)]
    with torch.no_grad():
        batched = _s3prl_upstream(up, wavs)
        runner_batched = _s3prl_runner_features(up, wavs)
        for i, w in enumerate(wavs):
            alone = _s3prl_upstream(up, [w])
            runner_alone = _s3prl_runner_features(up, [w])
            for (hb, lb), (ha, la), rb, ra in zip(batched, alone, runner_batched, runner_alone):
                n = int(la[0])
                assert n == int(lb[i]) == math.ceil(len(w) / 640) == ha.shape[1]
                assert torch.allclose(hb[i, :n], ha[0, :n], atol=1e-5), f"{len(w)} samples: S3PRLUpstream rows"
                assert rb[i].shape == ra[0].shape == (round(len(w) / 640), 64)
                assert torch.allclose(rb[i], ra[0], atol=1e-5), f"{len(w)} samples: the runner's rows"
            # what the Featurizer's weighted sum then pools: the mean over the valid frames is the same too
            w_sum = torch.stack([h for h, _ in batched]).mean(0)[i, : math.ceil(len(w) / 640)].mean(0)
            w_alone = torch.stack([h for h, _ in alone]).mean(0)[0].mean(0)
            assert torch.allclose(w_sum, w_alone, atol=1e-5)


def test_grad_and_modes(model_dir):
    up = UpstreamExpert(str(model_dir))
    wavs = _wavs()[:2]
    # frozen upstream (s3prl's default): no graph, no grads, grad mode left as it was
    with torch.no_grad():
        a = up(wavs)["hidden_states"]
        b = up(wavs)["hidden_states"]
    assert torch.is_grad_enabled()
    assert not any(h.requires_grad for h in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "eval mode is deterministic"
    assert all(p.grad is None for p in up.parameters())
    # fine-tuned upstream (s3prl -f): train mode, gradients reach the encoder
    up.train()
    assert up.model.training
    hs = up(wavs)["hidden_states"]
    assert all(h.requires_grad for h in hs[1:]) and not hs[0].requires_grad  # the level state has no weights
    torch.stack(hs).pow(2).mean().backward()
    assert up.model.encoder.blocks[0].qkv.weight.grad.abs().sum() > 0
    up.eval()
    assert not up.model.training


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        UpstreamExpert(None)
    with pytest.raises(CheckpointError, match="nope: model path not found"):
        svqmae_local(str(tmp_path / "nope"))


def _fake_s3prl(root):
    pkg = root / "s3prl"
    (pkg / "upstream" / "wav2vec2").mkdir(parents=True)
    (pkg / "hub.py").write_text("from s3prl.upstream.apc.hubconf import *\nfrom s3prl.upstream.wav2vec2.hubconf import *\n"
                                "\n\ndef options():\n    pass\n")
    return pkg


def _cli(*argv):
    """``svqmae s3prl-install ...`` through this module's own subparser (without importing every command)."""
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers(dest="command"))
    args = ap.parse_args(argv)
    args.func(args)


def test_install_into_an_s3prl_checkout(tmp_path, capsys):
    pkg = _fake_s3prl(tmp_path / "s3prl-repo")
    _cli("s3prl-install", str(tmp_path / "s3prl-repo"))
    assert "svqmae_local" in capsys.readouterr().out
    install(pkg)  # idempotent, from the package folder too
    hub = (pkg / "hub.py").read_text().splitlines()
    assert hub.count("from s3prl.upstream.svqmae.hubconf import *") == 1
    assert hub.index("from s3prl.upstream.svqmae.hubconf import *") == 3  # after the other upstreams
    assert sum("_svqmae_patch_s3prl()" in line for line in hub) == 1
    assert hub[0].startswith("from svqmae.s3prl import patch_s3prl")  # before any upstream imports torchaudio
    up_dir = pkg / "upstream" / "svqmae"
    assert {p.name for p in up_dir.iterdir()} == {"__init__.py", "expert.py", "hubconf.py"}
    # the files s3prl imports expose the entry and the expert (public callables = upstream names)
    names: dict = {}
    exec((up_dir / "hubconf.py").read_text(), names)
    public = [k for k, v in names.items() if callable(v) and not k.startswith("_")]
    assert public == ["svqmae_local"]
    expert: dict = {}
    exec((up_dir / "expert.py").read_text(), expert)
    assert expert["UpstreamExpert"] is UpstreamExpert
    with pytest.raises(FileNotFoundError, match="not an s3prl checkout"):  # svqmae prints it as one line, exit 2
        _cli("s3prl-install", str(tmp_path))


def test_install_defaults_to_the_installed_s3prl(tmp_path, monkeypatch, capsys):
    pkg = _fake_s3prl(tmp_path / "site-packages")
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    _cli("s3prl-install")
    assert (pkg / "upstream" / "svqmae" / "hubconf.py").is_file()
    assert "svqmae_local" in capsys.readouterr().out
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # a Python without s3prl
    with pytest.raises(FileNotFoundError, match="s3prl is not installed"):
        install()


# --------------------------------------------------------------------------- s3prl 0.4.18 on current torchaudio


@pytest.fixture
def bare_torchaudio(monkeypatch):
    """A torchaudio >= 2.9 as s3prl meets it: no set_audio_backend, no sox_effects (and no torchcodec)."""
    fake = types.ModuleType("torchaudio")
    fake.__path__ = []  # a package without the sox_effects submodule
    monkeypatch.setitem(sys.modules, "torchaudio", fake)
    monkeypatch.delitem(sys.modules, "torchaudio.sox_effects", raising=False)
    saved = torch.serialization.get_safe_globals()
    yield fake
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def test_patch_s3prl_fills_what_torchaudio_removed(bare_torchaudio, tmp_path):
    ckpt = tmp_path / "states-20.ckpt"
    torch.save({"Args": argparse.Namespace(mode="train", device="cpu"), "Step": 20}, ckpt)  # as s3prl's runner
    if argparse.Namespace not in torch.serialization.get_safe_globals():
        with pytest.raises(pickle.UnpicklingError, match="Namespace"):
            torch.load(ckpt, map_location="cpu")
    patch_s3prl()
    patch_s3prl()  # idempotent
    assert torch.load(ckpt, map_location="cpu")["Args"].device == "cpu"
    bare_torchaudio.set_audio_backend("sox_io")  # byol_s and run_downstream.py call it at import
    from torchaudio.sox_effects import apply_effects_file  # as s3prl's speech_commands dataset imports it

    # an 8 kHz stereo file through Speech Commands' effects: mono, 16 kHz, -3 dB
    t = np.arange(8000) / 8000
    left, right = 0.4 * np.sin(2 * np.pi * 200 * t), 0.2 * np.sin(2 * np.pi * 200 * t)
    sf.write(tmp_path / "a.wav", np.stack([left, right], 1), 8000)
    wav, sr = apply_effects_file(str(tmp_path / "a.wav"), [["channels", "1"], ["rate", "16000"], ["gain", "-3.0"]])
    assert sr == 16000 and wav.shape == (1, 16000) and wav.dtype == torch.float32
    mid = wav[0, 2000:-2000]  # away from the resampler's edges
    assert abs(float(mid.abs().max()) - 0.3 * 10 ** (-3 / 20)) < 0.01  # the channels' mean, 3 dB down
    wav, sr = apply_effects_file(str(tmp_path / "a.wav"), [["channels", "1"], ["norm"]])
    assert sr == 8000 and abs(float(wav.abs().max()) - 1.0) < 1e-6
    with pytest.raises(NotImplementedError, match="sox effect.*silence"):
        apply_effects_file(str(tmp_path / "a.wav"), [["silence", "1", "0.1", "0.1%"]])
    # torchaudio.load without torchcodec: soundfile, channels first
    x, sr = bare_torchaudio.load(tmp_path / "a.wav")
    assert sr == 8000 and x.shape == (2, 8000) and torch.allclose(x[1], 0.5 * x[0], atol=1e-4)
    with pytest.raises(RuntimeError, match="nope.wav: unreadable audio"):
        bare_torchaudio.load(str(tmp_path / "nope.wav"))
