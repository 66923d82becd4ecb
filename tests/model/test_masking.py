import pytest
import torch

from svqmae.model.masking import num_masked, padding_mask, span_mask, visible_index


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of maximal runs of True."""
    out, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


@pytest.mark.parametrize("ratio,span", [(0.7, 3), (0.6, 1), (0.8, 5), (0.5, 2)])
def test_exact_ratio_and_padding_never_masked(ratio, span):
    lengths = torch.tensor([50, 37, 10, 3, 1, 64])
    T = 64
    mask = span_mask(lengths, T, ratio, span, torch.Generator().manual_seed(0))
    assert mask.shape == (6, T) and mask.dtype == torch.bool
    for b, L in enumerate(lengths.tolist()):
        assert int(mask[b].sum()) == num_masked(L, ratio)
        assert not mask[b, L:].any(), "padding must never be masked"
    assert not (mask & padding_mask(lengths, T)).any()


def test_num_masked_keeps_one_visible_and_one_masked():
    assert num_masked(0, 0.7) == 0 and num_masked(1, 0.7) == 0
    assert num_masked(2, 0.99) == 1 and num_masked(2, 0.01) == 1
    assert num_masked(100, 0.7) == 70


def test_spans_have_the_configured_length():
    # 60 masked of 100 with span 5: every maximal run is a multiple of 5 (spans may touch)
    lengths = torch.full((32,), 100)
    mask = span_mask(lengths, 100, 0.6, 5, torch.Generator().manual_seed(1))
    for row in mask:
        runs = _runs(row)
        assert sum(runs) == 60 and all(r % 5 == 0 for r in runs)
    # and spans really are spread out, not one block
    assert sum(len(_runs(r)) for r in mask) / 32 > 4


def test_masking_is_a_pure_function_of_the_generator():
    lengths = torch.tensor([40, 25, 33])
    a = span_mask(lengths, 40, 0.7, 3, torch.Generator().manual_seed(7))
    b = span_mask(lengths, 40, 0.7, 3, torch.Generator().manual_seed(7))
    c = span_mask(lengths, 40, 0.7, 3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_position_can_be_masked():
    lengths = torch.full((400,), 20)
    mask = span_mask(lengths, 20, 0.7, 3, torch.Generator().manual_seed(0))
    freq = mask.float().mean(0)
    assert (freq > 0.3).all() and (freq < 1.0).all()


def test_visible_index_packs_visible_positions_in_order():
    lengths = torch.tensor([6, 4])
    mask = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    idx, n_vis = visible_index(mask, lengths)
    assert n_vis.tolist() == [3, 2]
    assert idx.shape == (2, 3)
    assert idx[0].tolist() == [1, 2, 4]
    assert idx[1, :2].tolist() == [0, 3]  # position 4, 5 are padding, not visible
