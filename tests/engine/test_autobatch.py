"""train.max_batch_seconds=auto (svqmae.engine.autobatch): the search, with a simulated device memory and
simulated out-of-memory errors on the CPU; the CPU default; the cache a resumed run reads."""

from __future__ import annotations

import json

import pytest
import torch

from svqmae import config as C
from svqmae.engine.autobatch import CACHE, memory_trial, resolve_batch_seconds, search_utterances
from svqmae.engine.speed import Speed
from svqmae.model import SVQMAE
from tests.model.test_svqmae import tiny_cfg

GiB = 2**30


def fake_device(per_utterance: float, fixed: float, memory: float):
    """trial(n) of a device with ``memory`` GiB: peak = fixed + n * per_utterance GiB, or out of memory."""
    calls = []

    def trial(n):
        calls.append(n)
        peak = (fixed + n * per_utterance) * GiB
        if peak > memory * GiB:
            raise torch.OutOfMemoryError("simulated")
        return int(peak)

    return trial, calls


@pytest.mark.parametrize("per_utterance,fixed,memory,margin", [(0.08, 1.0, 80, 0.85), (0.5, 0.2, 141, 0.9),
                                                                (3.0, 0.5, 16, 0.85)])
def test_the_search_finds_the_largest_batch_within_the_margin(per_utterance, fixed, memory, margin):
    trial, calls = fake_device(per_utterance, fixed, memory)
    n, tried = search_utterances(trial, int(margin * memory * GiB))
    best = int((margin * memory - fixed) / per_utterance)  # the true answer
    assert best * 0.95 <= n <= best
    assert len(calls) <= 24 and any(p is None for _, p in tried) is (max(calls) * per_utterance + fixed > memory)


def test_the_search_reports_when_not_even_one_utterance_fits():
    trial, _ = fake_device(per_utterance=10, fixed=1, memory=8)
    assert search_utterances(trial, 8 * GiB)[0] == 0


def test_a_trial_runs_a_real_step_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = SVQMAE(tiny_cfg().model)
    model.pack, model.shape_bucket = True, 8
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def measure(n):  # a simulated device: 1 GiB per utterance, 3.5 GiB of memory
        assert all(p.grad is not None for p in model.encoder.parameters())  # the backward pass ran
        seen.append(n)
        if n > 3:
            raise torch.OutOfMemoryError("simulated")
        return n * GiB

    trial = memory_trial(model, 0.5, torch.device("cpu"), bf16=False, peak=(lambda: None, measure))
    n, tried = search_utterances(trial, int(3.5 * GiB))
    assert n == 3 and seen == [1, 2, 4, 3] and tried[-2] == (4, None)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_is_the_preset_figure_on_a_cpu_and_a_searched_one_is_cached(tmp_path, capfd):
    cfg = C.resolve("tiny", overrides=["train.max_batch_seconds=auto"])
    model = SVQMAE(cfg.model)
    assert resolve_batch_seconds(cfg, tmp_path, model, Speed(), "cpu") == 120.0
    assert "the tiny preset's figure" in capfd.readouterr().err
    assert resolve_batch_seconds(C.resolve("tiny"), tmp_path, model, Speed(), "cuda") == 120.0  # not auto: as set
    searches = []

    def search(c, m):
        searches.append(1)
        return {"max_batch_seconds": 48 * c.train.max_utt_seconds, "utterances": 48}

    assert resolve_batch_seconds(cfg, tmp_path, model, Speed(pack=True), "cuda", search=search) == 384.0
    assert "384 s of audio (48 utterances of 8 s), found automatically" in capfd.readouterr().err
    cached = json.loads((tmp_path / CACHE).read_text())
    assert cached["max_batch_seconds"] == 384.0 and cached["key"]["pack"] is True
    # a resumed run reads it: no second search
    assert resolve_batch_seconds(cfg, tmp_path, model, Speed(pack=True), "cuda", search=search) == 384.0
    assert len(searches) == 1 and "found automatically earlier" in capfd.readouterr().err
    # what it depends on changed (the utterance length): searched again
    longer = C.resolve("tiny", overrides=["train.max_batch_seconds=auto", "train.max_utt_seconds=10"])
    assert resolve_batch_seconds(longer, tmp_path, model, Speed(pack=True), "cuda", search=search) == 480.0
    assert len(searches) == 2
