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


def ctc_model(*overrides, encoder=None):
    from svqmae.model.ctc import CTCModel

    cfg = resolve_finetune("tiny", overrides=TINY + list(overrides))
    torch.manual_seed(0)
    return CTCModel(cfg, 6, encoder=encoder).eval()


def test_layer_sum_reads_every_layer_and_trains_while_the_encoder_is_frozen():
    plain, summed = ctc_model(), ctc_model("ctc.layer_sum=true")
    summed.load_state_dict(plain.state_dict(), strict=False)  # same encoder and head
    waves, lengths = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0)), torch.tensor([8000, 5000])
    with torch.no_grad():  # all weight on the last (final-normed) layer: the plain head's input, up to LayerNorm's eps
        summed.layer_weights.copy_(torch.tensor([-1e4, -1e4, 0.0]))
        (a, frames), b = summed(waves, lengths), plain(waves, lengths)[0]
        for i, n in enumerate(frames.tolist()):  # real frames (padding's variance is small: eps shows there)
            assert torch.allclose(a[i, :n], b[i, :n], atol=1e-4)
        summed.layer_weights.zero_()  # uniform: the lower layers change the output
        assert not torch.allclose(summed(waves, lengths)[0], plain(waves, lengths)[0], atol=1e-3)
    lp, frames = summed.train()(waves, lengths, freeze=True)
    lp.sum().backward()
    assert summed.layer_weights.grad is not None and summed.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in summed.encoder.parameters())  # frozen


def test_reinit_top_restarts_only_the_top_blocks_of_a_pretrained_encoder():
    from svqmae.model import SVQMAE

    torch.manual_seed(1)
    pre = SVQMAE(resolve_finetune("tiny", overrides=TINY).model).drop_decoder()
    with torch.no_grad():  # "pre-trained": no parameter at its initial value
        for p in pre.parameters():
            p.add_(torch.randn_like(p))
    fresh = ctc_model("ctc.reinit_top=1", encoder=pre)
    for name, p in fresh.named_parameters():
        if name.startswith(("encoder.blocks.1.", "encoder.norm.")):
            assert not torch.isclose(p, pre.state_dict()[name]).any(), name
        elif not name.startswith("ctc_head."):
            assert torch.equal(p, pre.state_dict()[name]), name
    assert fresh.encoder.blocks[1].qkv.weight.std() < 0.03  # init_weights: std 0.02
    import pytest

    from svqmae.config import ConfigError
    with pytest.raises(ConfigError, match="reinit_top=3: the encoder has 2 blocks"):
        ctc_model("ctc.reinit_top=3", encoder=pre)
    from svqmae.model.ctc import CTCModel
    with pytest.raises(ConfigError, match="filterbank BiLSTM"):
        CTCModel(resolve_finetune("tiny", overrides=TINY + ["ctc.layer_sum=true"]), 6, backbone="lstm")
    CTCModel(resolve_finetune("tiny", overrides=TINY + ["ctc.reinit_top=1"]), 6, backbone="lstm")  # a no-op there
