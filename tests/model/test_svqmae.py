import contextlib
import math

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
        tokens, tok_len, level = model.frontend(waves, lengths, with_level=True)
        mask = span_mask(tok_len, tokens.shape[1], 0.7, 3, torch.Generator().manual_seed(0))
        noisy = torch.where(mask[..., None], torch.randn_like(tokens) * 5, tokens)
        if variant == "svqmae":
            a, slot = model.forward_encoder(tokens, mask, tok_len, level)
            b, _ = model.forward_encoder(noisy, mask, tok_len, level)
            n_vis = (~mask & ~padding_mask(tok_len, tokens.shape[1])).sum(1)
            assert a.shape[1] == int(n_vis.max())
            assert torch.allclose(a, b, atol=1e-6)
            ha = model.forward_decoder(a, slot, mask, tok_len)
            hb = model.forward_decoder(b, slot, mask, tok_len)
            assert ha.shape[0] == int(mask.sum()) and torch.allclose(ha, hb, atol=1e-6)
        else:
            a = model.forward_encoder_only(tokens, mask, tok_len, level)
            b = model.forward_encoder_only(noisy, mask, tok_len, level)
            assert torch.allclose(a, b, atol=1e-6)
        # ... while it does depend on the visible content
        changed = torch.where(~mask[..., None], tokens + 1.0, tokens)
        if variant == "svqmae":
            assert not torch.allclose(model.forward_encoder(changed, mask, tok_len, level)[0], a, atol=1e-3)


def test_encoder_sees_only_visible_tokens_and_their_original_positions():
    model = SVQMAE(tiny_cfg().model).eval()
    waves, lengths = batch(1, (1.6,))
    tokens, tok_len, level = model.frontend(waves, lengths, with_level=True)
    mask = span_mask(tok_len, tokens.shape[1], 0.7, 3, torch.Generator().manual_seed(0))
    seen = {}
    h = model.encoder.register_forward_hook(lambda m, args, out: seen.update(x=args[0], pos=args[1]))
    model.forward_encoder(tokens, mask, tok_len, level)
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
    tokens, tok_len, level = model.frontend(waves, lengths, with_level=True)
    mask = span_mask(tok_len, tokens.shape[1], 0.7, 3, torch.Generator().manual_seed(1))
    n = int(tok_len[2])
    with torch.no_grad():
        h = model.forward_decoder(*model.forward_encoder(tokens, mask, tok_len, level), mask, tok_len)
        one = (tokens[2:3, :n], mask[2:3, :n], tok_len[2:3], level[2:3])
        alone = model.forward_decoder(*model.forward_encoder(*one), one[1], one[2])
    assert alone.shape[0] == int(mask[2].sum())
    assert torch.allclose(h[-alone.shape[0]:], alone, atol=1e-5)  # the last utterance's masked rows


def test_extract_returns_every_layer():
    model = SVQMAE(tiny_cfg().model).drop_decoder().eval()
    assert not model.has_decoder and not hasattr(model, "decoder")
    waves, lengths = batch()
    with torch.no_grad():
        hs, tl = model.extract(waves, lengths)
        plain, _ = model.extract(waves, lengths, level_state=False)
    assert len(hs) == model.num_states == 1 + 1 + 2  # level, input embedding, 2 blocks
    assert all(h.shape == (3, 40, 64) for h in hs)
    assert len(plain) == 3 and all(torch.equal(a, b) for a, b in zip(hs[1:], plain))
    assert model.downsample_rate == 640


def test_level_state_is_the_utterance_level_and_nothing_else():
    """State 0 (model.features.level_state): the statistics per-utterance normalization removed, through a
    fixed orthonormal map, the same at every real token, zero at padding; a 12 dB quieter copy moves
    only the means' part (by 2 ln 0.25, except near-silent bins at the filterbank's floor)."""
    waves, lengths = batch()
    for dim, heads in ((64, 4), (256, 4)):  # D < 2F (a random subspace) and D >= 2F (all of the level)
        model = SVQMAE(tiny_cfg(f"model.encoder.dim={dim}", f"model.encoder.heads={heads}").model).eval()
        P = model.level_proj  # (2F, D)
        eye = torch.eye(min(160, dim))
        torch.testing.assert_close(P @ P.T if dim >= 160 else P.T @ P, eye, atol=1e-5, rtol=0)
        again = SVQMAE(tiny_cfg(f"model.encoder.dim={dim}", f"model.encoder.heads={heads}").model)
        assert torch.equal(again.level_proj, P), "a pure function of the config"
        with torch.no_grad():
            loud, tl = model.extract(waves, lengths)
            quiet, _ = model.extract(waves * 0.25, lengths)
            _, _, level = model.frontend(waves, lengths, with_level=True)  # (B, 2F)
            _, _, level_q = model.frontend(waves * 0.25, lengths, with_level=True)
        state = loud[0]  # (B, T, D)
        for b, n in enumerate(tl.tolist()):
            assert torch.equal(state[b, :n], state[b, :1].expand(n, -1)) and not state[b, n:].any()
        torch.testing.assert_close(state[:, 0], level @ P)
        torch.testing.assert_close(quiet[0][:, 0], level_q @ P)
        shift = level_q - level  # (B, 2F): means 12 dB down, log standard deviations about the same
        assert ((shift[:, :80] - 2 * math.log(0.25)).abs() < 0.05).float().mean() > 0.9, shift[:, :80]
        assert (shift[:, 80:].abs() < 0.05).float().mean() > 0.9, shift[:, 80:]


def test_reconstruction_loss_is_optional_and_the_decoders_job():
    model = SVQMAE(tiny_cfg("model.recon_weight=0.5").model)
    out = model(*batch(), torch.Generator().manual_seed(0))
    assert "recon" in out and torch.allclose(out["loss"], out["ce"] + 0.5 * out["recon"])
    assert "recon" not in SVQMAE(tiny_cfg("model.recon_weight=0").model)(*batch(), torch.Generator().manual_seed(0))
    # SVQ-MAE reconstructs from the decoder's output (width E), the ablation from the encoder's (D)
    assert model.recon_head.in_features == model.cfg.decoder.dim != model.cfg.encoder.dim
    ablation = SVQMAE(tiny_cfg("model.recon_weight=0.5", "model.variant=encoder_only").model)
    assert ablation.recon_head.in_features == ablation.cfg.encoder.dim
    # the reconstruction term alone trains the decoder too (its gradient goes through it), and nothing of it
    # is left once the decoder is dropped
    out["recon"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.blocks[0].parameters())
    model.drop_decoder()
    assert not hasattr(model, "recon_head") and not hasattr(model, "decoder")


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
    for variant, level in (("svqmae", False), ("encoder_only", False), ("svqmae", True)):
        torch.manual_seed(0)
        model = SVQMAE(tiny_cfg(f"model.variant={variant}", "model.recon_weight=0.1", f"model.features.level={level}").model)
        if level:
            torch.nn.init.normal_(model.level_embed.weight, std=0.05)  # each token's own utterance's level matters
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


def test_several_masks_per_utterance_share_one_front_end_pass():
    torch.manual_seed(0)
    waves, lengths = batch()
    one = SVQMAE(tiny_cfg().model).train()
    three = SVQMAE(tiny_cfg("model.mask.count=3").model).train()
    three.load_state_dict(one.state_dict())
    calls = []
    three.frontend.register_forward_hook(lambda *a: calls.append(1))
    a = one(waves, lengths, torch.Generator().manual_seed(0))
    b = three(waves, lengths, torch.Generator().manual_seed(0))
    assert len(calls) == 1  # one front end (and quantizer) pass for the three masked copies
    assert float(b["tokens"]) == 3 * float(a["tokens"]) and float(b["visible_tokens"]) == 3 * float(a["visible_tokens"])
    assert float(b["code_perplexity"]) == float(a["code_perplexity"])  # code statistics of the utterances, once
    assert torch.isfinite(b["loss"]) and abs(float(b["loss"]) - float(a["loss"])) < 0.5
    tokens, tok_len = three.frontend(waves, lengths)
    T = tokens.shape[1]
    masks = span_mask(tok_len.repeat(3), T, 0.7, 3, torch.Generator().manual_seed(0)).view(3, -1, T)
    assert not torch.equal(masks[0], masks[1])  # each copy gets its own mask


def test_level_reaches_the_encoder_and_only_with_model_features_level():
    """Per-utterance normalization makes a 12 dB quieter copy look the same; ``model.features.level``
    gives the encoder the utterance's level back (old models: the option off, hidden states unchanged)."""
    torch.manual_seed(0)
    waves, lengths = batch()
    gaps = {}
    for level in (False, True):
        model = SVQMAE(tiny_cfg(f"model.features.level={level}", "model.features.level_state=false").model).eval()
        if level:
            torch.nn.init.normal_(model.level_embed.weight, std=0.05)  # a clear signal for the test
        with torch.no_grad():
            a, tl = model.extract(waves, lengths)
            b, _ = model.extract(waves * 0.25, lengths)
            alone, _ = model.extract(waves[2:, : int(lengths[2])], lengths[2:])
        gaps[level] = float((a[0] - b[0]).abs().mean())  # the input embedding: loud vs quiet copy
        n = int(tl[2])
        assert all(torch.allclose(x[2, :n], y[0, :n], atol=1e-4) for x, y in zip(a, alone))  # padding-free
        out = model.train()(waves, lengths, torch.Generator().manual_seed(0))
        out["loss"].backward()
        if level:
            assert model.level_embed.weight.grad.abs().sum() > 0  # pre-training trains it
    assert gaps[True] > 10 * gaps[False], gaps



def test_mixing_changes_what_the_encoder_hears_not_the_targets():
    torch.manual_seed(0)
    waves, lengths = batch()
    # the ablation's encoder embeds every token, so what it hears can be compared token by token
    model = SVQMAE(tiny_cfg("model.mix.prob=1", "model.variant=encoder_only").model).train()
    seen = {"frontend": 0, "quantizer": [], "embed": []}
    model.frontend.register_forward_hook(lambda *a: seen.__setitem__("frontend", seen["frontend"] + 1))
    model.quantizer.register_forward_hook(lambda m, args, out: seen["quantizer"].append(args[0]))
    model.embed[0].register_forward_hook(lambda m, args, out: seen["embed"].append(args[0]))
    out = model(waves, lengths, torch.Generator().manual_seed(0))
    assert seen["frontend"] == 2 and torch.isfinite(out["loss"])  # the clean utterances, then the mixture
    clean, tok_len = model.frontend(waves, lengths)
    assert torch.equal(seen["quantizer"][0], clean)  # the targets: codes of the clean utterances
    valid = ~padding_mask(tok_len, clean.shape[1])
    heard = seen["embed"][0]
    assert not torch.allclose(heard[valid], clean[valid], atol=1e-3)  # the encoder: the mixture
    assert not heard[~valid].any()  # padding stays empty
    seen["frontend"], seen["embed"] = 0, []
    with torch.no_grad():
        model.eval()(waves, lengths, torch.Generator().manual_seed(0))  # validation: no mixing
    assert seen["frontend"] == 1 and torch.equal(seen["embed"][0], clean * valid[..., None])
