"""svqmae as an s3prl upstream (for the SUPERB benchmark), without s3prl as a dependency.

s3prl's contract (``s3prl/upstream/<name>/expert.py`` and ``hubconf.py``):

- ``UpstreamExpert(ckpt, model_config=None, **kwargs)``: an ``nn.Module``; s3prl's runner passes
  ``ckpt`` (``-k``), ``model_config`` (``-g``, unused here: the config travels with the weights) and
  ``refresh``;
- ``forward(wavs)``: a list of 1-D 16 kHz float tensors (different lengths) ->
  ``{"hidden_states": [(B, T, D), ...]}``, all the same shape, so that s3prl's Featurizer can learn a
  weighted sum of layers. s3prl takes ``ceil(len(wav) / downsample_rate)`` frames of each row as valid
  (``S3PRLUpstream``; the runner's Featurizer takes ``round(len(wav) / downsample_rate)``) and pads the
  batch to the longest utterance's count by repeating the last frame: the upstream returns exactly
  that many frames per utterance, so that a row does not depend on the batch it came in;
- ``get_downsample_rates(key) -> int``: input samples per output frame (640 for 25 Hz tokens);
- every public callable of ``hubconf.py`` is an upstream name for ``run_downstream.py -u NAME``.

``svqmae s3prl-install [S3PRL_DIR]`` writes ``s3prl/upstream/svqmae/{__init__,expert,hubconf}.py``
into an s3prl checkout or the installed s3prl package (thin files that import from this module),
registers them in ``s3prl/hub.py`` and makes :func:`patch_s3prl` its first line (s3prl 0.4.18 on
torchaudio >= 2.9 and torch >= 2.6); then ``run_downstream.py -u svqmae_local -k MODEL`` works
(docs/s3prl.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..model import SVQMAE, CheckpointError

SAMPLE_RATE = 16000  # s3prl feeds 16 kHz audio


class UpstreamExpert(nn.Module):
    """An svqmae encoder behind s3prl's upstream interface.

    ``ckpt``: a ``model/`` folder, a run DIR or a ``.ckpt`` (anything :func:`svqmae.load` takes).
    The encoder is loaded in eval mode; s3prl calls ``.train()`` on it only when fine-tuning the
    upstream (``-f``), and gradients flow through ``forward`` unless the caller disables them."""

    def __init__(self, ckpt: str | None = None, model_config: str | None = None, **kwargs):
        super().__init__()
        if not ckpt:
            raise CheckpointError("svqmae upstream: no checkpoint given (pass -k /path/to/model)")
        self.model = SVQMAE.from_pretrained(ckpt)
        if self.model.cfg.features.sample_rate != SAMPLE_RATE:
            raise CheckpointError(
                f"{ckpt}: model expects {self.model.cfg.features.sample_rate} Hz audio, s3prl feeds {SAMPLE_RATE} Hz"
            )
        self.name = f"[svqmae UpstreamExpert {Path(ckpt).name}]"
        self.eval()  # like the loaded encoder; s3prl switches to train() only to fine-tune it

    def get_downsample_rates(self, key: str = "hidden_states") -> int:
        """Input samples per output frame; the same for every key (all states share one frame rate)."""
        return self.model.downsample_rate

    def forward(self, wavs: list[torch.Tensor]) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """wavs: list of 1-D 16 kHz float tensors -> hidden states [level, input embedding, layer 1..L] (as
        ``model.extract``; no level in models without ``model.features.level_state``), each (B, T, D).

        Utterance i has ``frames(len_i) = ceil(len_i / 640)`` rows, the count s3prl takes as valid: the
        model's own tokens (``model.extract``'s, whose count drops a last partial token), then, where
        s3prl counts one frame more, the last token repeated, as s3prl itself pads; zero after that.
        T = the longest utterance's frame count. So every utterance's rows are the same alone and in
        any batch, under ``S3PRLUpstream`` and under the runner's Featurizer alike."""
        if not wavs:
            raise ValueError("svqmae upstream: empty batch")
        device = next(self.model.parameters()).device
        lengths = torch.tensor([w.shape[-1] for w in wavs], device=device)
        waves = pad_sequence([w.reshape(-1).float() for w in wavs], batch_first=True).to(device)
        hidden, tok_len = self.model.extract(waves, lengths)
        n = s3prl_frames(lengths, self.model.downsample_rate)  # (B,) frames s3prl counts valid
        n = torch.where(tok_len > 0, n, 0)  # an utterance too short for one token has no frame to repeat
        t = torch.arange(int(n.max()), device=device)[None, :]  # (1, T)
        src = torch.minimum(t, (tok_len - 1).clamp(min=0)[:, None])  # (B, T): past the last token, repeat it
        keep = (t < n[:, None])[..., None]  # (B, T, 1): zero past each utterance's frames
        hidden = [torch.gather(h, 1, src[..., None].expand(-1, -1, h.shape[-1])) * keep for h in hidden]
        return {"hidden_states": hidden, "last_hidden_state": hidden[-1]}


def s3prl_frames(num_samples: torch.Tensor, rate: int) -> torch.Tensor:
    """Frames s3prl counts valid for utterances of ``num_samples``: ``len(range(0, n, rate))`` =
    ceil(n / rate) (``S3PRLUpstream``; the runner's Featurizer keeps round(n / rate), never more)."""
    return torch.div(num_samples - 1, rate, rounding_mode="floor").clamp(min=-1) + 1


def svqmae_local(ckpt: str, *args, **kwargs) -> UpstreamExpert:
    """s3prl hub entry: ``run_downstream.py -u svqmae_local -k /path/to/model``."""
    return UpstreamExpert(ckpt, *args, **kwargs)


# --------------------------------------------------------------------------- s3prl 0.4.18 on current torch

SOX_EFFECTS = ("channels", "rate", "gain", "norm")  # what s3prl's SUPERB datasets ask of sox_effects


def patch_s3prl() -> None:
    """Let s3prl 0.4.18 (the current release) run on the torch and torchaudio it installs today.

    ``svqmae s3prl-install`` makes this the first thing ``s3prl/hub.py`` runs, so it precedes every
    s3prl import of torchaudio's removed parts. Idempotent. It changes only what is missing:

    - ``torchaudio.set_audio_backend`` (gone since torchaudio 2.9; s3prl calls it at import): a no-op;
    - ``torchaudio.sox_effects`` (gone since 2.9; Speech Commands, MOS, QUESST and VoxCeleb read
      their audio through ``apply_effects_file``): ``channels 1``, ``rate``, ``gain`` and ``norm`` on
      soundfile and soxr, no libsox needed (all the first three ask for); others, such as the
      ``silence`` of s3prl's speaker-verification recipe, are a clear error;
    - ``torchaudio.load`` when ``torchcodec`` (its decoder since 2.9) is not installed: soundfile;
    - ``torch.load`` of s3prl's own checkpoints (they hold an ``argparse.Namespace``, refused by
      the weights-only loading that torch >= 2.6 does by default): ``Namespace`` is allowed.
    """
    import argparse
    import importlib.util
    import sys
    import types

    import torchaudio

    if not hasattr(torchaudio, "set_audio_backend"):
        torchaudio.set_audio_backend = lambda backend=None: None
    if "torchaudio.sox_effects" not in sys.modules and importlib.util.find_spec("torchaudio.sox_effects") is None:
        mod = types.ModuleType("torchaudio.sox_effects")
        mod.__doc__ = "svqmae's stand-in for torchaudio.sox_effects (removed in torchaudio 2.9)"
        mod.apply_effects_file = apply_effects_file
        mod.apply_effects_tensor = apply_effects_tensor
        sys.modules["torchaudio.sox_effects"] = mod
        torchaudio.sox_effects = mod
    if importlib.util.find_spec("torchcodec") is None:
        torchaudio.load = load_audio
    torch.serialization.add_safe_globals([argparse.Namespace])


def load_audio(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True,
               channels_first: bool = True, **_) -> tuple[torch.Tensor, int]:
    """``torchaudio.load`` on soundfile: (channels, frames) float32 in [-1, 1] and the sample rate."""
    import soundfile as sf

    try:
        x, sr = sf.read(str(uri) if isinstance(uri, Path) else uri, start=frame_offset,
                        frames=num_frames, dtype="float32" if normalize else "int16", always_2d=True)
    except Exception as e:
        raise RuntimeError(f"{uri}: unreadable audio ({e})") from None
    x = torch.from_numpy(x)
    return (x.T.contiguous() if channels_first else x), sr


def apply_effects_tensor(wav: torch.Tensor, sample_rate: int, effects, channels_first: bool = True):
    """``torchaudio.sox_effects.apply_effects_tensor`` for ``channels 1``, ``rate R``, ``gain dB``, ``norm``."""
    from ..data.audio import resample

    x = wav if channels_first else wav.T  # (C, S)
    for effect in effects:
        name, *opts = [str(o) for o in effect]
        if name == "channels" and opts == ["1"]:
            x = x.mean(0, keepdim=True)
        elif name == "rate" and len(opts) == 1:
            sr = int(float(opts[0]))
            if sr != sample_rate:
                x = torch.stack([torch.from_numpy(resample(c.numpy(), sample_rate, sr)) for c in x.float()])
                sample_rate = sr
        elif name == "gain" and len(opts) == 1:
            x = x * 10 ** (float(opts[0]) / 20)
        elif name == "norm" and not opts:  # peak to 0 dBFS
            x = x / x.abs().max().clamp_min(1e-12)
        else:
            raise NotImplementedError(
                f"sox effect {effect}: torchaudio.sox_effects is gone from torchaudio >= 2.9 and svqmae's "
                f"stand-in has only {', '.join(SOX_EFFECTS)} (channels 1); install torchaudio < 2.9 with libsox for more"
            )
    return (x if channels_first else x.T), sample_rate


def apply_effects_file(path, effects, normalize: bool = True, channels_first: bool = True, format=None):
    """``torchaudio.sox_effects.apply_effects_file``: read ``path`` (soundfile), then the effects."""
    wav, sr = load_audio(path)
    return apply_effects_tensor(wav, sr, effects, channels_first)


# --------------------------------------------------------------------------- installing into s3prl

_EXPERT = '''"""svqmae upstream: the implementation lives in the svqmae package (pip install svqmae)."""
from svqmae.s3prl import UpstreamExpert  # noqa: F401
'''

_HUBCONF = '''"""svqmae upstream entries; usage: run_downstream.py -u svqmae_local -k /path/to/model"""
from svqmae.s3prl import svqmae_local  # noqa: F401
'''

_HUB_LINE = "from s3prl.upstream.svqmae.hubconf import *"
_PATCH_LINE = ("from svqmae.s3prl import patch_s3prl as _svqmae_patch_s3prl; _svqmae_patch_s3prl()"
               "  # svqmae: s3prl 0.4.18 on current torch/torchaudio")


def install(s3prl_dir: str | Path | None = None) -> Path:
    """Write the upstream files into s3prl and register them in ``s3prl/hub.py`` (with
    :func:`patch_s3prl` as its first line).

    ``s3prl_dir`` is a checkout's root (holding ``s3prl/hub.py``) or an ``s3prl/`` package folder;
    default: the s3prl package this Python imports (``pip install s3prl``). Idempotent; returns the
    upstream folder."""
    if s3prl_dir is None:
        import importlib.util

        spec = importlib.util.find_spec("s3prl")
        if spec is None or not spec.origin:
            raise FileNotFoundError("s3prl is not installed in this Python (pip install s3prl==0.4.18), "
                                    "and no S3PRL_DIR was given")
        s3prl_dir = Path(spec.origin).parent
    root = Path(s3prl_dir)
    pkg = root / "s3prl" if (root / "s3prl" / "hub.py").is_file() else root
    hub = pkg / "hub.py"
    if not hub.is_file() or not (pkg / "upstream").is_dir():
        raise FileNotFoundError(f"{root}: not an s3prl checkout (no s3prl/hub.py and s3prl/upstream/)")
    up = pkg / "upstream" / "svqmae"
    up.mkdir(exist_ok=True)
    (up / "__init__.py").write_text("")
    (up / "expert.py").write_text(_EXPERT)
    (up / "hubconf.py").write_text(_HUBCONF)
    text = hub.read_text()
    if _PATCH_LINE not in text.splitlines():  # first, before any upstream imports torchaudio's removed parts
        text = _PATCH_LINE + "\n" + text
        hub.write_text(text)
    if _HUB_LINE not in text.splitlines():
        # after the last upstream import, so that s3prl's options() lists it with the others
        lines = text.splitlines(keepends=True)
        last = max((i for i, line in enumerate(lines) if line.startswith("from s3prl.upstream.")), default=-1)
        if lines and not lines[last if last >= 0 else -1].endswith("\n"):
            lines[last if last >= 0 else -1] += "\n"
        lines.insert(last + 1, _HUB_LINE + "\n")
        hub.write_text("".join(lines))
    return up


def cmd_install(args) -> None:
    up = install(args.s3prl_dir)
    print(f"s3prl-install: wrote {up} and registered svqmae_local in {up.parents[1] / 'hub.py'}; then:\n"
          "  python -m s3prl.run_downstream -m train -u svqmae_local -k /path/to/model -d DOWNSTREAM "
          "-c CONFIG.yaml -n EXP [--device cpu]")


def add_cli(sub) -> None:
    p = sub.add_parser("s3prl-install", help="register svqmae as an s3prl upstream (svqmae_local) in an s3prl checkout")
    p.add_argument("s3prl_dir", metavar="S3PRL_DIR", nargs="?",
                   help="s3prl repository root or its s3prl/ package folder (default: the installed s3prl package)")
    p.set_defaults(func=cmd_install)
