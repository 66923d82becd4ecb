"""svqmae as an s3prl upstream (for the SUPERB benchmark), without s3prl as a dependency.

s3prl's contract (``s3prl/upstream/<name>/expert.py`` and ``hubconf.py``):

- ``UpstreamExpert(ckpt, model_config=None, **kwargs)``: an ``nn.Module``; s3prl's runner passes
  ``ckpt`` (``-k``), ``model_config`` (``-g``, unused here: the config travels with the weights) and
  ``refresh``;
- ``forward(wavs)``: a list of 1-D 16 kHz float tensors (different lengths) ->
  ``{"hidden_states": [(B, T, D), ...]}``, all the same shape, so that s3prl's Featurizer can learn a
  weighted sum of layers; s3prl trims each utterance to ``round(len(wav) / downsample_rate)`` frames;
- ``get_downsample_rates(key) -> int``: input samples per output frame (640 for 25 Hz tokens);
- every public callable of ``hubconf.py`` is an upstream name for ``run_downstream.py -u NAME``.

``svqmae s3prl-install S3PRL_DIR`` writes ``s3prl/upstream/svqmae/{__init__,expert,hubconf}.py``
into an s3prl checkout (thin files that import from this module) and registers them in
``s3prl/hub.py``; then ``run_downstream.py -u svqmae_local -k MODEL`` works.
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
        ``model.extract``; no level in models without ``model.features.level_state``), each
        (B, T, D) with T = the longest utterance's token count (shorter ones are zero-padded)."""
        if not wavs:
            raise ValueError("svqmae upstream: empty batch")
        device = next(self.model.parameters()).device
        lengths = torch.tensor([w.shape[-1] for w in wavs], device=device)
        waves = pad_sequence([w.reshape(-1).float() for w in wavs], batch_first=True).to(device)
        hidden, tok_len = self.model.extract(waves, lengths)
        # zero the padding so that pooling downstreams (e.g. mean over frames) see no stray values
        keep = (torch.arange(hidden[0].shape[1], device=device)[None, :] < tok_len[:, None])[..., None]
        hidden = [h * keep for h in hidden]
        return {"hidden_states": hidden, "last_hidden_state": hidden[-1]}


def svqmae_local(ckpt: str, *args, **kwargs) -> UpstreamExpert:
    """s3prl hub entry: ``run_downstream.py -u svqmae_local -k /path/to/model``."""
    return UpstreamExpert(ckpt, *args, **kwargs)


# --------------------------------------------------------------------------- installing into s3prl

_EXPERT = '''"""svqmae upstream: the implementation lives in the svqmae package (pip install svqmae)."""
from svqmae.s3prl import UpstreamExpert  # noqa: F401
'''

_HUBCONF = '''"""svqmae upstream entries; usage: run_downstream.py -u svqmae_local -k /path/to/model"""
from svqmae.s3prl import svqmae_local  # noqa: F401
'''

_HUB_LINE = "from s3prl.upstream.svqmae.hubconf import *"


def install(s3prl_dir: str | Path) -> Path:
    """Write the upstream files into an s3prl checkout and register them in ``s3prl/hub.py``.

    ``s3prl_dir`` is the repository root (holding ``s3prl/hub.py``) or its ``s3prl/`` package folder.
    Idempotent; returns the upstream folder."""
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
    print(f"s3prl-install: wrote {up}; run from {up.parents[1]}: "
          "python3 run_downstream.py -m train -u svqmae_local -k /path/to/model -d DOWNSTREAM -n EXP")


def add_cli(sub) -> None:
    p = sub.add_parser("s3prl-install", help="register svqmae as an s3prl upstream (svqmae_local) in an s3prl checkout")
    p.add_argument("s3prl_dir", metavar="S3PRL_DIR", help="s3prl repository root (or its s3prl/ package folder)")
    p.set_defaults(func=cmd_install)
