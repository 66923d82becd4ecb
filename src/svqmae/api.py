"""The public Python surface: load a model, save it, extract features.

``load`` reads a ``model/`` folder, a run DIR or a ``.ckpt`` (see :mod:`svqmae.model.io` for the
layout); ``extract_audio`` takes waveforms at any sample rate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.audio import resample
from .model import SVQMAE
from .model.io import CheckpointError, atomic_write_bytes, load_config, save_model

__all__ = ["load", "save_model", "extract_audio", "load_config", "CheckpointError", "atomic_write_bytes"]


def load(path: str | Path, with_decoder: bool = False, device: str | torch.device = "cpu") -> SVQMAE:
    """Load a pre-trained model (a ``model/`` folder, a run DIR or a ``.ckpt``), in eval mode.

    By default the decoder is dropped and the encoder is returned; ``model.extract(waves, lengths)``
    gives every layer's hidden states."""
    return SVQMAE.from_pretrained(path, with_decoder=with_decoder, device=device)


@torch.no_grad()
def extract_audio(
    model: SVQMAE, waves: list[np.ndarray | torch.Tensor], sample_rate: int = 16000
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hidden states for a list of 1-D waveforms at any sample rate (resampled to the model's)."""
    target = model.cfg.features.sample_rate
    xs = [torch.as_tensor(resample(np.asarray(w, dtype=np.float32), sample_rate, target)) for w in waves]
    lengths = torch.tensor([len(x) for x in xs])
    batch = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
    device = next(model.parameters()).device
    return model.extract(batch.to(device), lengths.to(device))
