"""CTC fine-tuning, transcription and scoring on a tiny model and a synthetic spelled-letters set."""

from __future__ import annotations

import torch

from svqmae.config import resolve_finetune
from svqmae.model.ctc import spec_augment
from tests.conftest import FINETUNE_FAST, TINY_MODEL_OVERRIDES

TINY, FAST = TINY_MODEL_OVERRIDES, FINETUNE_FAST


def test_spec_augment_masks_inside_the_utterance_only():
    cfg = resolve_finetune("tiny", overrides=["specaug.time_mask_prob=0.2", "specaug.freq_mask_width=10"])
    x = torch.ones(2, 40, 4 * 80)
    lengths = torch.tensor([40, 20])
    a = spec_augment(x, lengths, cfg.specaug, 4, torch.Generator().manual_seed(3))
    b = spec_augment(x, lengths, cfg.specaug, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # a pure function of the generator
    assert (a == 0).any() and (a == 1).any()
    zero_tokens = (a.view(2, 40, 4, 80) == 0).all(-1).all(-1)  # whole tokens masked in time
    assert zero_tokens[0].any() and zero_tokens[1].any() and not zero_tokens[1, 20:].any()
    zero_bins = (a.view(2, 40, 4, 80)[:, :20] == 0).all(1).all(1)  # the same bins in every frame
    assert zero_bins.any()
