import math

import pytest
import torch

from svqmae.model.mixing import mix_utterances


def noisy_batch(lengths, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = S or max(lengths)
    waves = torch.zeros(len(lengths), S)
    for b, L in enumerate(lengths):
        waves[b, :L] = torch.randn(L, generator=g) * (0.1 + 0.2 * b)  # each utterance its own level
    return waves, torch.tensor(lengths)


def find_source(segment: torch.Tensor, waves: torch.Tensor, lengths: torch.Tensor):
    """(utterance, offset, gain) whose samples ``segment`` is a scaled copy of."""
    n = len(segment)
    for p, L in enumerate(lengths.tolist()):
        for o in range(L - n + 1):
            src = waves[p, o:o + n]
            gain = float(segment @ src / (src @ src))
            if gain > 0 and torch.allclose(segment, gain * src, atol=1e-5):
                return p, o, gain
    return None


def test_nothing_changes_and_nothing_is_drawn_without_mixing():
    waves, lengths = noisy_batch([300, 200, 120])
    g = torch.Generator().manual_seed(3)
    assert mix_utterances(waves, lengths, 0.0, 0.5, 5.0, g) is waves
    assert torch.equal(mix_utterances(waves[:1], lengths[:1], 1.0, 0.5, 5.0, g), waves[:1])  # B < 2
    assert torch.rand(1, generator=g) == torch.rand(1, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("max_share,ratio_db", [(0.5, 5.0), (0.2, 0.0)])
def test_each_utterance_gets_one_scaled_segment_of_another_inside_its_own_length(max_share, ratio_db):
    lengths = [300, 257, 180, 90, 61]
    waves, lens = noisy_batch(lengths, S=320)
    out = mix_utterances(waves, lens, 1.0, max_share, ratio_db, torch.Generator().manual_seed(0))
    mixed = 0
    for b, L in enumerate(lengths):
        diff = out[b] - waves[b]
        where = diff.abs() > 1e-7
        assert not where[L:].any(), "padding must stay zero"
        if not where.any():
            continue
        idx = where.nonzero()[:, 0]
        start, end = int(idx[0]), int(idx[-1]) + 1
        assert end - start <= math.floor(max_share * L)  # at most max_share of the primary
        found = find_source(diff[start:end], waves, lens)
        assert found is not None, "the added samples are a contiguous, scaled piece of an utterance"
        p, _, gain = found
        assert p != b, "never the utterance itself"
        e_b = float((waves[b, :L] ** 2).mean())
        e_added = float((diff[start:end] ** 2).mean())
        assert abs(10 * math.log10(e_b / e_added)) <= ratio_db + 0.05  # primary-to-added energy ratio
        mixed += 1
    assert mixed >= 4  # prob 1: every utterance but one whose overlap came out tiny


def test_mixing_is_seeded_and_chooses_the_share_asked():
    waves, lengths = noisy_batch([160] * 400, seed=1)
    a = mix_utterances(waves, lengths, 0.3, 0.5, 5.0, torch.Generator().manual_seed(5))
    b = mix_utterances(waves, lengths, 0.3, 0.5, 5.0, torch.Generator().manual_seed(5))
    c = mix_utterances(waves, lengths, 0.3, 0.5, 5.0, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    share = float(((a - waves).abs().sum(1) > 0).float().mean())
    assert 0.22 < share < 0.38  # 0.3 of 400 utterances (binomial sd 0.023)
