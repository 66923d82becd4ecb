import pytest
import torch

from svqmae.model.masking import (
    mask_counts,
    num_masked,
    num_masked_tensor,
    padding_mask,
    span_mask,
    true_positions,
    visible_index,
)


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


def test_masks_do_not_depend_on_padding():
    # row b's mask is a function of (generator, b, lengths[b]) only: a longer padded T (shape buckets) or
    # another utterance's length changes nothing
    lengths = torch.tensor([30, 17, 25])
    a = span_mask(lengths, 30, 0.7, 3, torch.Generator().manual_seed(3))
    b = span_mask(lengths, 48, 0.7, 3, torch.Generator().manual_seed(3))
    assert torch.equal(a, b[:, :30]) and not b[:, 30:].any()
    c = span_mask(torch.tensor([30, 9, 25]), 30, 0.7, 3, torch.Generator().manual_seed(3))
    assert torch.equal(a[[0, 2]], c[[0, 2]])


def test_true_positions_match_boolean_indexing():
    x = torch.rand(5, 13) > 0.4
    n = int(x.sum())
    assert torch.equal(true_positions(x, n), x.flatten().nonzero().flatten())
    assert true_positions(x, n + 3)[n:].tolist() == [0, 0, 0]  # a longer result is padded with position 0
    assert torch.equal(true_positions(x, 4), x.flatten().nonzero().flatten()[:4])


def test_visible_index_takes_its_width_from_the_host():
    lengths = torch.tensor([6, 4])
    mask = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    idx, n_vis = visible_index(mask, lengths, V=8)  # wider than T: padded
    assert idx.shape == (2, 8) and n_vis.tolist() == [3, 2]
    assert idx[0, :3].tolist() == [1, 2, 4] and not idx[:, 3:].any()
    masked, visible = mask_counts([6, 4, 1], 0.7)
    assert masked == [num_masked(L, 0.7) for L in (6, 4, 1)] and visible == [6 - masked[0], 4 - masked[1], 1]
    assert num_masked_tensor(torch.tensor([0, 1, 2, 5, 100]), 0.7).tolist() == [num_masked(L, 0.7) for L in (0, 1, 2, 5, 100)]
