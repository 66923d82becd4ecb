"""The packed layout (svqmae.model.transformer): sequences end to end, each attending to its own only."""

import torch

from svqmae.config import TransformerConfig
from svqmae.model.masking import padding_mask
from svqmae.model.transformer import Transformer, attend, pack_rows


def _padded(counts, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = ~padding_mask(torch.tensor(counts), L)
    return torch.randn(len(counts), L, D, generator=g), valid


def test_pack_rows_lays_real_tokens_end_to_end_with_a_bucketed_tail():
    _, valid = _padded([5, 0, 3], 6, 1)
    p = pack_rows(valid, [5, 0, 3], bucket=4)
    assert p.total == 8 and p.rows.tolist()[:8] == [0, 1, 2, 3, 4, 12, 13, 14] and p.rows.shape == (8,)
    assert p.cu_seqlens.tolist() == [0, 5, 8] and p.max_len == 5
    p = pack_rows(valid, [5, 0, 3], bucket=16)  # a tail of 8: a sequence of its own
    assert p.rows.shape == (16,) and p.cu_seqlens.tolist() == [0, 5, 8, 16] and p.max_len == 8
    assert p.key_mask()[:, 0, 0].tolist() == valid.tolist()


def test_packed_attention_is_the_padded_attention_dropout_included():
    counts, L, H, hd = [5, 3, 4], 5, 2, 4
    x, valid = _padded(counts, L, 3 * H * hd)
    q, k, v = x.view(3, L, 3, H, hd).unbind(2)  # (B, L, H, hd)
    p = pack_rows(valid, counts, bucket=8)
    packed = [t.flatten(0, 1)[p.rows][None] for t in (q, k, v)]  # (1, P, H, hd)
    real = p.rows[: p.total]
    for dropout in (0.0, 0.3):
        torch.manual_seed(1)
        a = attend(*packed, p, dropout)[0, : p.total]
        torch.manual_seed(1)
        b = attend(q, k, v, valid[:, None, None, :], dropout).flatten(0, 1)[real]
        assert torch.allclose(a, b, atol=1e-6), dropout


def test_a_packed_transformer_gives_each_sequence_what_it_gives_it_padded():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(layers=2, dim=16, heads=2, ffn_dim=32, dropout=0.0)).eval()
    counts = [7, 2, 5]
    x, valid = _padded(counts, 7, 16)
    pos = torch.arange(7).expand(3, 7) * 2  # original positions with gaps, as the encoder's
    p = pack_rows(valid, counts, bucket=4)
    with torch.no_grad():
        padded = model(x, pos, valid)
        packed = model(x.flatten(0, 1)[p.rows][None], pos.flatten()[p.rows][None], None, p)
    for a, b in zip(packed, padded):
        assert torch.allclose(a[0, : p.total], b.flatten(0, 1)[p.rows[: p.total]], atol=1e-5)
