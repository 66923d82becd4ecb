import torch

from svqmae.config import QuantizerConfig
from svqmae.model.quantizer import Quantizer, code_stats


def test_random_quantizer_is_deterministic_and_frozen():
    cfg = QuantizerConfig(codebook_size=64, code_dim=8, num_codebooks=2, seed=3)
    q1, q2 = Quantizer(cfg, 40), Quantizer(cfg, 40)
    assert list(q1.parameters()) == [], "the default quantizer has nothing to train"
    assert torch.equal(q1.proj, q2.proj) and torch.equal(q1.codebook, q2.codebook)
    x = torch.randn(3, 17, 40)
    c1, c2 = q1(x), q2(x)
    assert c1.shape == (3, 17, 2) and c1.dtype == torch.long
    assert torch.equal(c1, c2)
    assert (c1 >= 0).all() and (c1 < 64).all()
    before = q1.codebook.clone()
    q1.train()
    q1.update(x, c1, torch.ones(3, 17, dtype=torch.bool))
    assert torch.equal(before, q1.codebook), "random-projection codebook must stay frozen"
    assert not torch.equal(Quantizer(QuantizerConfig(seed=4, codebook_size=64, code_dim=8), 40).proj, q1.proj[:1])


def test_codes_depend_on_the_input_not_on_its_scale_only():
    q = Quantizer(QuantizerConfig(codebook_size=256, code_dim=16), 40)
    x = torch.randn(1, 200, 40)
    codes = q(x)
    assert codes.unique().numel() > 50
    assert torch.equal(q(x * 3.0), codes)  # projection is linear, codes use the direction


def test_learned_vq_moves_codebook_towards_data_and_revives_dead_codes():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="learned", codebook_size=16, code_dim=4, ema_decay=0.5)
    q = Quantizer(cfg, 8)
    x = torch.randn(4, 50, 8)
    valid = torch.ones(4, 50, dtype=torch.bool)
    z = q.project(x)[valid][:, 0]  # (N, d)
    err0 = (1 - (z @ q.codebook[0].T).max(-1).values).mean()
    for _ in range(20):
        q.update(x, q(x), valid)
    err1 = (1 - (z @ q.codebook[0].T).max(-1).values).mean()
    assert err1 < err0
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(1, 16), atol=1e-5)


def test_code_stats_perplexity_and_usage():
    codes = torch.arange(8).repeat(4).view(1, 32, 1)
    valid = torch.ones(1, 32, dtype=torch.bool)
    s = code_stats(codes, valid, K=16)
    assert abs(float(s["code_perplexity"]) - 8.0) < 1e-4
    assert abs(float(s["code_usage"]) - 0.5) < 1e-6
    valid[:, 16:] = False  # padding is not counted
    codes[0, 16:, 0] = 15
    assert abs(float(code_stats(codes, valid, K=16)["code_usage"]) - 0.5) < 1e-6


def test_ema_statistics_add_up_and_apply_as_one_step_or_not_at_all():
    cfg = QuantizerConfig(kind="learned", codebook_size=16, code_dim=4, ema_decay=0.5)
    q = Quantizer(cfg, 8)
    x = torch.randn(4, 50, 8)
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[3, 20:] = False
    codes = q(x)
    # the EMA step by hand, on the valid tokens only
    z, c = q.project(x)[valid][:, 0], codes[valid][:, 0]
    count = torch.bincount(c, minlength=16).float()
    total = torch.zeros(16, 4).index_add_(0, c, z)
    ema_count, ema_sum = 0.5 * q.ema_count[0] + 0.5 * count, 0.5 * q.ema_sum[0] + 0.5 * total
    # two halves' statistics, added, equal the whole batch's
    a, b = q.update_stats(x[:2], codes[:2], valid[:2]), q.update_stats(x[2:], codes[2:], valid[2:])
    whole = q.update_stats(x, codes, valid)
    assert torch.allclose(a["count"] + b["count"], whole["count"]) and torch.allclose(a["total"] + b["total"], whole["total"], atol=1e-5)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.apply_update(whole, skip=torch.tensor(True))  # a step skipped on the device: nothing changes
    q.apply_update(whole, skip=True)
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    q.apply_update(whole, skip=torch.tensor(False))
    assert torch.allclose(q.ema_count[0], ema_count) and torch.allclose(q.ema_sum[0], ema_sum, atol=1e-5)
    alive = ema_count >= 1e-3
    expected = torch.nn.functional.normalize(ema_sum / ema_count.clamp_min(1e-5)[:, None], dim=-1)
    assert torch.allclose(q.codebook[0][alive], expected[alive], atol=1e-5)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(1, 16), atol=1e-5)
