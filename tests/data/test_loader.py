"""svqmae.data: every kind of source, lenient vs strict loading, data check, batching, and a
pre-training run that meets bad files."""

from __future__ import annotations

import pytest
import torch

from svqmae.data import (
    WaveformBatches,
    load_source,
    pretrain_loader,
)
from svqmae.data.audio import AudioError
from tests.conftest import harmonic_tone, write_wav


def test_loader_batches_are_bucketed_cropped_and_survive_bad_files(tmp_path):
    d = tmp_path / "d"
    for i in range(20):
        write_wav(d / f"u{i:02d}.wav", harmonic_tone(0.6 + 0.4 * (i % 8), seed=i))
    cuts = load_source(d)
    loader = pretrain_loader(cuts, max_batch_seconds=6.0, max_utt_seconds=2.0, num_buckets=3, num_workers=0, seed=0)
    seen, total = set(), 0
    for b in loader:
        assert b["waves"].shape[0] == len(b["ids"]) == len(b["lengths"])
        assert int(b["lengths"].max()) <= 2 * 16000  # long ones randomly cropped
        assert float(b["lengths"].sum()) / 16000 <= 6.0 + 1e-6
        seen.update(b["ids"])
        total += len(b["ids"])
    assert seen == {c.id for c in cuts} and total == len(cuts)
    # a file that goes bad after the scan is dropped from its batch and reported, never a crash
    (d / "u03.wav").write_bytes(b"")
    out = WaveformBatches(max_seconds=2.0)[(0, 0, cuts)]
    assert len(out["ids"]) == 19 and out["failed"][0][0].endswith("u03.wav")
    with pytest.raises(AudioError, match="u03.wav"):
        WaveformBatches(strict=True)[(0, 0, cuts)]


def test_crops_are_reproducible_per_epoch(tmp_path):
    write_wav(tmp_path / "long.wav", harmonic_tone(5.0))
    cuts = load_source(tmp_path / "long.wav")
    ds = WaveformBatches(max_seconds=1.0, seed=3)
    a, b, c = (ds[(e, 0, cuts)]["waves"] for e in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (1, 16000)


def test_auto_workers_per_device(monkeypatch):
    from svqmae.data.loader import resolve_workers

    assert resolve_workers(3) == 3 and resolve_workers("0") == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)))
    assert resolve_workers("auto") == 1  # 2 CPU cores: one loader process, the other core trains
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    assert resolve_workers("auto") == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_workers("auto") == 15  # 16 cores per GPU, one left for the training process
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(256)))
    assert resolve_workers("auto") == 16
