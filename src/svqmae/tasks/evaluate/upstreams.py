"""Frozen feature extractors ("upstreams", in SUPERB's words) behind one interface.

An upstream turns a batch of 16 kHz waveforms into every hidden layer it has:
``upstream(waves (B, S), lengths (B,)) -> (hidden (L, B, T, D), frame_lengths (B,))``.

Names understood by :func:`get_upstream`:

- a path: an svqmae ``model/`` folder, run DIR or checkpoint (:func:`svqmae.load`);
- ``fbank``: SUPERB's FBANK baseline, 80-dim log-mel with deltas and delta-deltas (240 dims, 100 Hz),
  as a single "layer"; utterance tasks pool its frames by their mean;
- ``fbank-stats``: the same frames with statistics pooling: utterance tasks see each dimension's mean
  and standard deviation over the utterance's frames (480 numbers), the spread that mean pooling
  discards (loudness and pitch movement, rate); ASR sees the same frames as ``fbank``;
- ``random`` or ``random:PRESET``: the SVQ-MAE architecture of that preset (default ``tiny``), untrained,
  seeded (``random:tiny:SEED`` picks another seed);
- ``hf:PATH``: a local Hugging Face wav2vec 2.0 / HuBERT / WavLM folder, via ``AutoModel`` with
  ``output_hidden_states``.

Every upstream has a ``key``: a short string that changes whenever its weights (or its pooling) do,
used to cache features on disk, and a :meth:`Upstream.pool`: how utterance tasks pool its frames.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ... import config as C
from ...config import ConfigError
from ...model import SVQMAE
from ...model.io import CheckpointError
from ...model.masking import padding_mask

SAMPLE_RATE = 16000


def _digest(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def _weights_digest(module: nn.Module, extra: str = "") -> str:
    """A digest of every weight (and ``extra``): the cache key changes exactly when the model does."""
    h = hashlib.blake2b(digest_size=8)
    h.update(extra.encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")[:40] or "model"


class Upstream(nn.Module):
    """Base class. Subclasses set ``name``, ``key``, ``num_layers``, ``dim`` and ``frame_rate``."""

    name: str
    key: str
    num_layers: int
    dim: int
    frame_rate: float  # output frames per second
    batch_invariant: bool = True  # an utterance's features do not depend on the padding of its batch
    state0: str = "input embedding"  # what the first hidden state is
    pooling: str = "mean"  # how utterance tasks pool frames (see pool)

    @torch.no_grad()
    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pool(self, frames: torch.Tensor) -> torch.Tensor:
        """One utterance's real frames of every layer (L, n, D), padding already cut off -> the vector per
        layer that utterance tasks see (L, D'): here their mean (SUPERB)."""
        return frames.mean(1)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def describe(self) -> dict:
        return {"name": self.name, "key": self.key, "layers": self.num_layers, "dim": self.dim,
                "frame_rate": self.frame_rate, "state0": self.state0, "pooling": self.pooling}


class SVQMAEUpstream(Upstream):
    """An svqmae encoder (trained, or untrained for the ``random`` baseline)."""

    def __init__(self, model, name: str, key: str):
        super().__init__()
        self.model = model.eval()
        self.name, self.key = name, key
        self.num_layers = model.num_states  # [level,] input embedding, one per block
        self.dim = model.cfg.encoder.dim
        self.frame_rate = SAMPLE_RATE / model.downsample_rate
        self.state0 = "level" if model.cfg.features.level_state else "input embedding"

    @torch.no_grad()
    def forward(self, waves, lengths):
        hidden, tok_len = self.model.extract(waves, lengths)
        return torch.stack(hidden), tok_len


def load_svqmae(path: str | Path) -> SVQMAEUpstream:
    model = SVQMAE.from_pretrained(path)
    p = Path(path).resolve()
    name = p.parent.name if p.name == "model" else p.name
    return SVQMAEUpstream(model, f"svqmae:{name}", f"svqmae-{_slug(name)}-{_weights_digest(model, _states(model))}")


def _states(model: SVQMAE) -> str:
    """What the states are beyond the weights (part of the cache key; empty for what older versions extracted)."""
    return "level_state" if model.cfg.features.level_state else ""


def random_upstream(spec: str = "random") -> SVQMAEUpstream:
    """``random[:PRESET[:SEED]]``: the SVQ-MAE architecture, untrained, initialized from SEED (default 0)."""
    parts = spec.split(":")
    preset = parts[1] if len(parts) > 1 and parts[1] else "tiny"
    try:
        seed = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise ConfigError(f"{spec}: expected random:PRESET:SEED with an integer seed") from None
    cfg = C.resolve(preset)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = SVQMAE(cfg.model).drop_decoder()
    finally:
        torch.random.set_rng_state(state)
    return SVQMAEUpstream(model, f"random:{preset}", f"random-{preset}-s{seed}-{_weights_digest(model, _states(model))}")


class FbankUpstream(Upstream):
    """SUPERB's FBANK baseline: 80-bin log-mel (25 ms / 10 ms, Kaldi-compatible, lhotse) plus deltas and
    delta-deltas, as one layer of 240 dims. No per-utterance normalization (mean pooling of
    utterance-normalized features would be all zeros); heads standardize with training statistics."""

    def __init__(self, n_mels: int = 80, deltas: bool = True):
        super().__init__()
        from lhotse.features.kaldi.layers import Wav2LogFilterBank

        self.fbank = Wav2LogFilterBank(sampling_rate=SAMPLE_RATE, frame_length=0.025, frame_shift=0.01,
                                       num_filters=n_mels)
        self.hop, self.win = SAMPLE_RATE // 100, SAMPLE_RATE * 25 // 1000
        self.deltas = deltas
        self.name = "fbank"
        self.key = f"fbank-{n_mels}{'-d2' if deltas else ''}-v1"
        self.num_layers, self.dim, self.frame_rate = 1, n_mels * (3 if deltas else 1), 100.0
        self.state0 = "filterbank"

    @staticmethod
    def _delta(x: torch.Tensor, n_frames: torch.Tensor, n: int = 2) -> torch.Tensor:
        """Regression deltas over +-n frames (as Kaldi's add-deltas), each utterance's edges replicated.
        x: (B, N, F); n_frames: (B,) real frames."""
        B, N, _ = x.shape
        t = torch.arange(-n, N + n, device=x.device)[None]  # positions with n frames of context each side
        idx = torch.minimum(t.clamp_min(0), (n_frames.to(x.device)[:, None] - 1))  # (B, N + 2n)
        pad = x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))
        num = sum(k * (pad[:, n + k : n + k + N] - pad[:, n - k : n - k + N]) for k in range(1, n + 1))
        return num / (2 * sum(k * k for k in range(1, n + 1)))

    @torch.no_grad()
    def forward(self, waves, lengths):
        feats = self.fbank(waves.float())  # (B, N, F)
        # frames whose 25 ms window lies inside the utterance (later ones would see the batch's padding)
        n_frames = (torch.div(lengths - self.win // 2 - self.hop // 2, self.hop, rounding_mode="floor") + 1)
        n_frames = n_frames.clamp(1, feats.shape[1])
        if self.deltas:
            d1 = self._delta(feats, n_frames)
            feats = torch.cat([feats, d1, self._delta(d1, n_frames)], dim=-1)
        feats = feats.masked_fill(padding_mask(n_frames, feats.shape[1])[..., None], 0.0)
        return feats[None], n_frames


class FbankStatsUpstream(FbankUpstream):
    """The FBANK baseline with statistics pooling (as x-vectors pool): an utterance is each dimension's
    mean and standard deviation over its frames, [mean, std] (2 x 240). Mean pooling hides how much the
    level, pitch and spectrum move within the utterance; this baseline sees it, as SVQ-MAE's level state
    (each bin's log standard deviation) does. Frames (for ASR) are the same as ``fbank``'s."""

    pooling = "mean+std"

    def __init__(self):
        super().__init__()
        self.name = "fbank-stats"
        self.key = f"{self.key}-stats"

    def pool(self, frames: torch.Tensor) -> torch.Tensor:
        """(L, n, D) -> (L, 2D): [mean, standard deviation] over the n frames (population: 0 for one frame)."""
        return torch.cat([frames.mean(1), frames.std(1, correction=0)], dim=-1)


class HFUpstream(Upstream):
    """A local Hugging Face speech encoder folder (wav2vec 2.0, HuBERT, WavLM, data2vec-audio)."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            import transformers
            from transformers import AutoConfig, AutoModel
        except ImportError:
            raise CheckpointError(f"hf:{path}: the transformers package is needed (pip install transformers)") from None
        p = Path(path)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p}: not a Hugging Face model folder (no config.json)")
        transformers.logging.set_verbosity_error()  # unused pre-training heads are expected
        transformers.logging.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(str(p))
            self.model = AutoModel.from_pretrained(str(p), config=config).eval()
        except Exception as e:
            raise CheckpointError(f"{p}: cannot load Hugging Face model ({str(e).splitlines()[0][:200]})") from None
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise CheckpointError(f"{p}: {type(self.model).__name__} is not a waveform encoder (wav2vec 2.0 family)")
        prep = {}
        if (p / "preprocessor_config.json").is_file():
            prep = json.loads((p / "preprocessor_config.json").read_text())
        self.normalize = bool(prep.get("do_normalize", True))
        # models with group norm in the conv front end were trained without attention masks: padding would
        # leak into their features, so they see one utterance at a time
        self.use_attention_mask = getattr(config, "feat_extract_norm", "layer") == "layer"
        self.batch_invariant = self.use_attention_mask
        self.name = f"hf:{p.name}"
        self.key = f"hf-{_slug(p.name)}-{_weights_digest(self.model, str(self.normalize))}"
        self.num_layers = config.num_hidden_layers + 1
        self.dim = config.hidden_size
        self.frame_rate = SAMPLE_RATE / float(np.prod(config.conv_stride))

    @torch.no_grad()
    def forward(self, waves, lengths):
        valid = ~padding_mask(lengths, waves.shape[1])
        x = waves.float()
        if self.normalize:  # zero mean, unit variance per utterance, over real samples (as the HF feature extractor)
            n = lengths[:, None].clamp_min(1).float()
            mean = (x * valid).sum(1, keepdim=True) / n
            var = (((x - mean) * valid) ** 2).sum(1, keepdim=True) / n
            x = (x - mean) / torch.sqrt(var + 1e-7) * valid
        out = self.model(x, attention_mask=valid.long() if self.use_attention_mask else None,
                         output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)  # (L, B, T, D)
        frames = self.model._get_feat_extract_output_lengths(lengths).clamp(1, hidden.shape[2])
        return hidden, frames.long()


def get_upstream(spec: str, device: str | torch.device = "cpu") -> Upstream:
    """An upstream by name (see the module docstring), frozen, in eval mode, on ``device``."""
    if spec == "fbank":
        up: Upstream = FbankUpstream()
    elif spec == "fbank-stats":
        up = FbankStatsUpstream()
    elif spec == "random" or spec.startswith("random:"):
        up = random_upstream(spec)
    elif spec.startswith("hf:"):
        up = HFUpstream(spec[3:])
    else:
        if not Path(spec).exists():
            raise CheckpointError(
                f"{spec}: model not found (give an svqmae model/ or run folder, fbank, fbank-stats, random[:PRESET] or hf:PATH)"
            )
        up = load_svqmae(spec)
    for p in up.parameters():
        p.requires_grad_(False)
    up.spec = spec  # the name it was asked by
    return up.to(device).eval()
