import contextlib

import torch

from svqmae.config import resolve
from svqmae.model import SVQMAE
from svqmae.model.masking import padding_mask, span_mask
from tests.conftest import harmonic_tone


def tiny_cfg(*extra):
    return resolve("tiny", overrides=[
        "model.encoder.layers=2", "model.encoder.dim=64", "model.encoder.heads=4", "model.encoder.ffn_dim=128",
        "model.decoder.layers=1", "model.decoder.dim=32", "model.decoder.heads=2", "model.decoder.ffn_dim=64",
        "model.quantizer.codebook_size=64", *extra,
    ])


def batch(B=3, seconds=(1.6, 1.2, 0.7)):
    xs = [torch.from_numpy(harmonic_tone(s, f0=120 + 30 * i, seed=i)) for i, s in enumerate(seconds[:B])]
    lengths = torch.tensor([len(x) for x in xs])
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True), lengths


def test_encoder_output_does_not_depend_on_masked_content():
    torch.manual_seed(0)
    for variant in ("svqmae", "encoder_only"):
        model = SVQMAE(tiny_cfg(f"model.variant={variant}").model).eval()
        waves, lengths = batch()
        tokens, tok_len = model.frontend(waves, lengths)
        mask = span_mask(tok_len, tokens.shape[1], 0.7, 3, torch.Generator().manual_seed(0))
        noisy = torch.where(mask[..., None], torch.randn_like(tokens) * 5, tokens)
        if variant == "svqmae":
            a, slot = model.forward_encoder(tokens, mask, tok_len)
            b, _ = model.forward_encoder(noisy, mask, tok_len)
            n_vis = (~mask & ~padding_mask(tok_len, tokens.shape[1])).sum(1)
            assert a.shape[1] == int(n_vis.max())
            assert torch.allclose(a, b, atol=1e-6)
            ha = model.forward_decoder(a, slot, mask, tok_len)
            hb = model.forward_decoder(b, slot, mask, tok_len)
            assert ha.shape[0] == int(mask.sum()) and torch.allclose(ha, hb, atol=1e-6)
        else:
            a = model.forward_encoder_only(tokens, mask, tok_len)
            b = model.forward_encoder_only(noisy, mask, tok_len)
            assert torch.allclose(a, b, atol=1e-6)
        # ... while it does depend on the visible content
        changed = torch.where(~mask[..., None], tokens + 1.0, tokens)
        if variant == "svqmae":
            assert not torch.allclose(model.forward_encoder(changed, mask, tok_len)[0], a, atol=1e-3)


def test_encoder_sees_only_visible_tokens_and_their_original_positions():
    model = SVQMAE(tiny_cfg().model).eval()
    waves, lengths = batch(1, (1.6,))
    tokens, tok_len = model.frontend(waves, lengths)
    mask = span_mask(tok_len, tokens.shape[1], 0.7, 3, torch.Generator().manual_seed(0))
    seen = {}
    h = model.encoder.register_forward_hook(lambda m, args, out: seen.update(x=args[0], pos=args[1]))
    model.forward_encoder(tokens, mask, tok_len)
    h.remove()
    assert seen["x"].shape[1] == int((~mask).sum())  # V = 30% of T
    assert seen["pos"][0].tolist() == torch.nonzero(~mask[0]).flatten().tolist()


def test_forward_returns_loss_and_metrics_and_padding_does_not_leak():
    model = SVQMAE(tiny_cfg().model)
    waves, lengths = batch()
    out = model(waves, lengths, torch.Generator().manual_seed(0))
    for k in ("loss", "ce", "masked_acc", "code_perplexity", "code_usage"):
        assert torch.isfinite(out[k])
    assert abs(float(out["visible_tokens"]) / float(out["tokens"]) - 0.3) < 0.03
    out["loss"].backward()
    assert model.encoder.blocks[0].qkv.weight.grad is not None
    # extraction: one utterance alone == the same utterance inside a padded batch
    model.eval()
    with torch.no_grad():
        hs, tl = model.extract(waves, lengths)
        alone, tl1 = model.extract(waves[2:3, : lengths[2]], lengths[2:3])
    n = int(tl1[0])
    assert tl[2] == n
    for a, b in zip(hs, alone):
        assert torch.allclose(a[2, :n], b[0, :n], atol=1e-4)


def test_decoder_output_does_not_depend_on_batch_padding():
    model = SVQMAE(tiny_cfg().model).eval()
    assert model.dec_conv is not None and model.dec_conv.kernel_size == (15,)
    waves, lengths = batch()
    tokens, tok_len = model.frontend(waves, lengths)
    mask = span_mask(tok_len, tokens.shape[1], 0.7, 3, torch.Generator().manual_seed(1))
    n = int(tok_len[2])
    with torch.no_grad():
        h = model.forward_decoder(*model.forward_encoder(tokens, mask, tok_len), mask, tok_len)
        one = (tokens[2:3, :n], mask[2:3, :n], tok_len[2:3])
        alone = model.forward_decoder(*model.forward_encoder(*one), one[1], one[2])
    assert alone.shape[0] == int(mask[2].sum())
    assert torch.allclose(h[-alone.shape[0]:], alone, atol=1e-5)  # the last utterance's masked rows


def test_extract_returns_every_layer():
    model = SVQMAE(tiny_cfg().model).drop_decoder().eval()
    assert not model.has_decoder and not hasattr(model, "decoder")
    waves, lengths = batch()
    with torch.no_grad():
        hs, tl = model.extract(waves, lengths)
    assert len(hs) == 2 + 1
    assert all(h.shape == (3, 40, 64) for h in hs)
    assert model.downsample_rate == 640


def test_reconstruction_loss_is_optional():
    model = SVQMAE(tiny_cfg("model.recon_weight=0.5").model)
    out = model(*batch(), torch.Generator().manual_seed(0))
    assert "recon" in out and torch.allclose(out["loss"], out["ce"] + 0.5 * out["recon"])
    assert "recon" not in SVQMAE(tiny_cfg().model)(*batch(), torch.Generator().manual_seed(0))


def test_loss_falls_on_a_tiny_run():
    torch.manual_seed(0)
    model = SVQMAE(tiny_cfg().model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    waves, lengths = batch()
    losses = []
    for step in range(30):
        out = model(waves, lengths, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # ln(64) = 4.16 at chance


def test_padding_mask_polarity():
    assert padding_mask(torch.tensor([2, 0]), 3).tolist() == [[False, False, True], [True, True, True]]


def _step(model, waves, lengths, seed=3):
    out = model(waves, lengths, torch.Generator().manual_seed(seed))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def test_packed_and_bucketed_layouts_give_the_plain_path_loss_and_gradients():
    # how the step is laid out (encoder tokens packed end to end, token counts padded to a bucket) changes
    # no mask and no result: the same loss, and gradients within 1e-5 of the largest (fp32, CPU)
    waves, lengths = batch()
    for variant in ("svqmae", "encoder_only"):
        torch.manual_seed(0)
        model = SVQMAE(tiny_cfg(f"model.variant={variant}", "model.recon_weight=0.1").model)
        ref, gref = _step(model, waves, lengths)
        for pack, bucket in ((True, 1), (False, 8), (True, 16)):
            model.pack, model.shape_bucket = pack, bucket
            out, grads = _step(model, waves, lengths)
            for k in ("loss", "masked_acc", "code_perplexity", "visible_tokens", "tokens"):
                assert torch.allclose(out[k], ref[k], rtol=1e-6, atol=0), (variant, pack, bucket, k)
            assert grads.keys() == gref.keys()
            for k, g in grads.items():
                assert (g - gref[k]).abs().max() <= 1e-5 * gref[k].abs().max() + 1e-12, (variant, pack, bucket, k)


def test_a_training_step_never_reads_device_values_on_the_host(monkeypatch):
    # on the meta device every tensor has a shape and no values: reading one on the host (.item(), a
    # boolean index, .cpu()) raises. Forward and backward run there, so a step needs no host synchronisation
    # (only the lengths, given on the host, and the CPU generator have values).
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # no autocast for meta
    waves, lengths = batch()
    for extra, pack in ((("model.variant=svqmae",), False), (("model.quantizer.kind=learned", "model.recon_weight=0.1"), True),
                        (("model.variant=encoder_only",), False)):
        model = SVQMAE(tiny_cfg(*extra).model).to("meta")
        model.pack, model.shape_bucket = pack, 8
        out = model(waves.to("meta"), lengths, torch.Generator().manual_seed(0))
        out["loss"].backward()
        assert out["loss"].device.type == "meta"
        if "quantizer_stats" in out:
            model.quantizer.apply_update(out["quantizer_stats"], skip=torch.zeros((), dtype=torch.bool, device="meta"))
