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


def test_speed_perturbation_is_seeded_bounded_and_keeps_the_crop_length(tmp_path):
    write_wav(tmp_path / "short.wav", harmonic_tone(1.0))
    write_wav(tmp_path / "long.wav", harmonic_tone(5.0))
    cuts = load_source(tmp_path)
    plain = WaveformBatches(max_seconds=2.0, seed=3)[(0, 0, cuts)]
    ds = WaveformBatches(max_seconds=2.0, seed=3, speed=0.1)
    a, b = ds[(0, 0, cuts)], ds[(0, 0, cuts)]
    assert torch.equal(a["waves"], b["waves"])  # a pure function of seed, epoch and cut id
    n = dict(zip(a["ids"], a["lengths"].tolist()))
    short = next(i for i in a["ids"] if i.startswith("short"))
    # the 1-s utterance: 1/factor as long for a factor in [0.9, 1.1], and not its plain length
    assert 16000 / 1.1 - 2 <= n[short] <= 16000 / 0.9 + 2 and n[short] != 16000
    long_ = next(i for i in a["ids"] if i.startswith("long"))
    assert abs(n[long_] - 2 * 16000) <= 2  # cropped before the change of speed: still max_seconds
    lengths = {tuple(ds[(e, 0, cuts)]["lengths"].tolist()) for e in range(6)}
    assert len(lengths) > 1 and tuple(plain["lengths"].tolist()) not in lengths  # every epoch a new speed


def test_a_lazy_manifest_streams_and_resumes_exactly_by_replaying_its_metadata(tmp_path):
    from svqmae.data import split_heldout
    from svqmae.data.loader import heldout_from_head

    rows = ["path\tseconds"]
    for i in range(30):
        write_wav(tmp_path / f"u{i:02d}.wav", harmonic_tone(0.6 + 0.1 * (i % 6), seed=i))
        rows.append(f"u{i:02d}.wav\t{0.6 + 0.1 * (i % 6):.3f}")
    (tmp_path / "m.tsv").write_text("\n".join(rows) + "\n")
    from svqmae.data import sources

    sources.LAZY_MANIFEST_BYTES, old = 10, sources.LAZY_MANIFEST_BYTES
    try:
        cuts = load_source(tmp_path / "m.tsv", sources.Problems())
    finally:
        sources.LAZY_MANIFEST_BYTES = old
    assert cuts.is_lazy
    train, held = split_heldout(cuts, 4)
    assert len(held) == 4 and [c.id for c in held] == [c.id for c in heldout_from_head(cuts, 4)]
    assert train.is_lazy and not {c.id for c in train} & {c.id for c in held}

    def take(start, n):
        it = iter(pretrain_loader(train, 3.0, 1.0, 3, 0, seed=0, start=start, buffer_size=8))
        return [(b["epoch"], b["index"], b["ids"]) for b, _ in zip(it, range(n))]

    whole = take((0, 0), 20)
    assert {i for e, _, ids in whole if e == 0 for i in ids} == {c.id for c in train}
    e, i, _ = whole[12]
    assert take((e, i), 8) == whole[12:]
