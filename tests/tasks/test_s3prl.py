"""svqmae against s3prl's upstream contract (s3prl itself is not installed: it needs torchaudio)."""

import argparse

import pytest
import torch

from svqmae.model import CheckpointError, save_model
from svqmae.tasks.s3prl import UpstreamExpert, add_cli, install, svqmae_local
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
    T = (max(LENGTHS) + 80) // 640
    assert all(h.shape == (3, T, 64) for h in hs)
    assert out["last_hidden_state"] is hs[-1]
    # s3prl's Featurizer asserts |T - round(max_len / rate)| < 5, then keeps round(len / rate) frames per row
    assert abs(T - round(max(LENGTHS) / rate)) <= 1
    # each row holds its own utterance's states; padding is zero
    model = up.model
    for i, w in enumerate(_wavs()):
        n = (len(w) + 80) // 640
        assert (hs[-1][i, n:] == 0).all() and hs[-1][i, :n].abs().sum() > 0
    with torch.no_grad():
        alone = model.extract(_wavs()[2][None], torch.tensor([LENGTHS[2]]))[0]
    assert torch.allclose(hs[-1][2], alone[-1][0], atol=1e-5)  # the longest row is unpadded


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
    assert hub.index("from s3prl.upstream.svqmae.hubconf import *") == 2  # after the other upstreams
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
