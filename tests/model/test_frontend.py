import torch

from svqmae.model import SVQMAE
from tests.model.test_svqmae import batch, tiny_cfg


def test_frontend_shapes_and_token_lengths():
    model = SVQMAE(tiny_cfg().model)
    waves, lengths = batch()
    tokens, tok_len = model.frontend(waves, lengths)
    assert tokens.shape[-1] == 80 * 4
    assert tok_len.tolist() == [40, 30, 17]  # 25 Hz: (S + 80) // 160 // 4
    assert tokens.shape[1] == 40
    assert (tokens[2, 17:] == 0).all(), "padding tokens are zero"
    valid = tokens[0].reshape(-1, 80)
    assert abs(float(valid.mean())) < 1e-4 and abs(float(valid.std()) - 1) < 1e-2  # utterance-normalized


def test_global_norm_keeps_loudness_and_round_trips(tmp_path):
    utt, glob = SVQMAE(tiny_cfg().model), SVQMAE(tiny_cfg("model.features.norm=global").model)
    waves, lengths = batch(B=1)
    feats, n = glob.frontend.log_mel(waves, lengths)
    f = feats[0, : int(n[0])]
    glob.frontend.set_global_stats(f.mean(0), f.std(0))
    quiet = waves * 0.25  # the same speech, 12 dB quieter
    a, b = glob.frontend(waves, lengths)[0], glob.frontend(quiet, lengths)[0]
    assert float((a - b).mean()) > 0.3  # the level survives global normalization ...
    ua, ub = utt.frontend(waves, lengths)[0], utt.frontend(quiet, lengths)[0]
    assert float((ua - ub).abs().mean()) < 0.05  # ... and not per-utterance normalization
    tok = a[0].reshape(-1, 80)
    assert abs(float(tok.mean())) < 0.05 and abs(float(tok.std()) - 1) < 0.1  # normalized by its own stats
    glob.save_pretrained(tmp_path / "m")
    again = SVQMAE.from_pretrained(tmp_path / "m")
    assert torch.equal(again.frontend.global_std, glob.frontend.global_std)
    assert torch.allclose(again.extract(waves, lengths)[0][-1], glob.eval().extract(waves, lengths)[0][-1])


def test_level_is_what_utterance_normalization_removes_and_ignores_padding():
    model = SVQMAE(tiny_cfg().model)
    waves, lengths = batch()
    tokens, tok_len, level = model.frontend(waves, lengths, with_level=True)
    assert torch.equal(tokens, model.frontend(waves, lengths)[0]) and level.shape == (3, 160)
    feats, _ = model.frontend.log_mel(waves, lengths)
    f = feats[2, : int(tok_len[2]) * 4]  # the shortest utterance's real frames
    assert torch.allclose(level[2, :80], f.mean(0), atol=1e-4)
    assert torch.allclose(level[2, 80:], f.std(0, unbiased=False).log(), atol=1e-3)
    alone = model.frontend(waves[2:, : int(lengths[2])], lengths[2:], with_level=True)[2]
    assert torch.allclose(alone[0], level[2], atol=1e-4)  # padding changes nothing
    quiet = model.frontend(waves * 0.25, lengths, with_level=True)[2]
    assert float((level[:, :80] - quiet[:, :80]).mean()) > 2.0  # 12 dB quieter: the level sees it
