"""svqmae.data: every kind of source, lenient vs strict loading, data check, batching, and a
pre-training run that meets bad files."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from lhotse import RecordingSet, SupervisionSet

from svqmae import cli
from svqmae import config as C
from svqmae.data import (
    DataError,
    Problems,
    check_source,
    cut_fields,
    cuts_to_rows,
    load_cut,
    load_source,
    load_sources,
    write_manifest,
)
from svqmae.data.audio import AudioError
from tests.conftest import TINY_MODEL_OVERRIDES, harmonic_tone, write_wav


def _bad_folder(tmp_path):
    """A folder with good files, a corrupt one, an empty one and an 8 kHz stereo one."""
    d = tmp_path / "mixed"
    for i in range(3):
        write_wav(d / "sub" / f"good{i}.wav", harmonic_tone(1.0, seed=i))
    (d / "corrupt.wav").write_bytes(b"RIFF" + bytes(200))
    (d / "empty.flac").write_bytes(b"")
    x = harmonic_tone(1.5, sr=8000, seed=9)
    sf.write(str(d / "stereo8k.wav"), np.stack([x, x], 1), 8000)
    return d


def test_folder_lenient_collects_problems_strict_names_the_file(tmp_path):
    d = _bad_folder(tmp_path)
    problems = Problems()
    cuts = load_source(d, problems)
    assert sorted(c.id for c in cuts) == ["stereo8k", "sub/good0", "sub/good1", "sub/good2"]
    assert sorted(p.split("/")[-1] for p, _ in problems.items) == ["corrupt.wav", "empty.flac"]
    with pytest.raises(DataError, match="corrupt.wav|empty.flac"):
        load_source(d)
    stereo = next(c for c in cuts if c.id == "stereo8k")
    assert load_cut(stereo).shape == (24000,)  # down-mixed, resampled to 16 kHz


def test_data_check_names_corrupt_and_empty_and_handles_8khz_stereo(tmp_path, capsys):
    d = _bad_folder(tmp_path)
    assert cli.main(["data", "check", str(d)]) == 0
    out = capsys.readouterr().out
    assert "4 usable utterances" in out
    assert "corrupt.wav" in out and "empty.flac" in out and "problem files: 2" in out
    assert "8000 Hz x1" in out and "16000 Hz x3" in out and "2 x1" in out  # rates and channels
    assert "stereo8k" not in out.split("problem files")[1]
    assert cli.main(["data", "check", str(d), "--strict"]) == 2


def test_check_finds_truncated_and_nan_files_that_headers_miss(tmp_path):
    d = tmp_path / "d"
    write_wav(d / "ok.wav", harmonic_tone(1.0))
    x = harmonic_tone(1.0)
    x[10] = np.nan
    sf.write(str(d / "nan.wav"), x, 16000, subtype="FLOAT")
    f = d / "trunc.flac"
    sf.write(str(f), np.random.default_rng(0).standard_normal(32000) * 0.1, 16000)
    f.write_bytes(f.read_bytes()[:3000])
    rep = check_source(d)
    assert sorted(p.split("/")[-1] for p, _ in rep.problems.items) == ["nan.wav", "trunc.flac"]
    assert rep.count == 1 and rep.hours == pytest.approx(1 / 3600)
    assert len(check_source(d, decode=False).problems) == 0  # headers alone look fine


def test_tsv_and_csv_manifests_with_segments_and_fields(tmp_path):
    write_wav(tmp_path / "a" / "x.wav", harmonic_tone(2.0))
    write_wav(tmp_path / "a" / "y.wav", harmonic_tone(1.0, seed=1))
    (tmp_path / "m.tsv").write_text(
        "path\tlabel\ttext\tspeaker\tstart\tend\n"
        "a/x.wav\tyes\thello there\ts1\t0.5\t1.5\n"
        "a/x.wav\tno\t\ts1\t1.5\t\n"
        "a/y.wav\t\t\ts2\t\t\n")
    cuts = list(load_source(tmp_path / "m.tsv"))
    assert [round(c.duration, 3) for c in cuts] == [1.0, 0.5, 1.0]
    assert cut_fields(cuts[0]) == {"label": "yes", "text": "hello there", "speaker": "s1"}
    assert cut_fields(cuts[2])["label"] == "" and len({c.id for c in cuts}) == 3
    assert load_cut(cuts[1]).shape == (8000,)
    (tmp_path / "m.csv").write_text("path,label\na/y.wav,go\n")
    assert cut_fields(load_source(tmp_path / "m.csv")[0])["label"] == "go"
    # written back as a manifest, it reads the same
    write_manifest(cuts_to_rows(cuts, tmp_path / "out"), tmp_path / "out" / "m.tsv")
    again = list(load_source(tmp_path / "out" / "m.tsv"))
    assert [(c.start, c.duration, cut_fields(c)) for c in again] == [(c.start, c.duration, cut_fields(c)) for c in cuts]


@pytest.mark.parametrize("text, match", [
    ("file\nx.wav\n", "no 'path' column"),
    ("path\tstart\nx.wav\tsoon\n", "row 2: 'start' is not a number"),
    ("path\n", "header but no rows"),
    ("", "empty manifest"),
])
def test_bad_manifests_name_the_file(tmp_path, text, match):
    write_wav(tmp_path / "x.wav", harmonic_tone(0.5))
    m = tmp_path / "bad.tsv"
    m.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        load_source(m)
    assert str(m) in str(e.value)


def test_lhotse_cutset_and_recording_supervision_manifests(tmp_path):
    write_wav(tmp_path / "x.wav", harmonic_tone(2.0))
    (tmp_path / "m.tsv").write_text("path\tlabel\tspeaker\tstart\tend\nx.wav\tup\tspk\t0\t1\nx.wav\tdown\tspk\t1\t2\n")
    cuts = load_source(tmp_path / "m.tsv")
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    back = load_source(tmp_path / "cuts.jsonl.gz")
    assert [cut_fields(c)["label"] for c in back] == ["up", "down"]
    # recordings + supervisions, the pair found by name; cuts trimmed to the supervisions
    recs = RecordingSet.from_recordings({c.recording.id: c.recording for c in cuts}.values())
    sups = SupervisionSet.from_segments(
        s.with_offset(c.start) for c in cuts for s in c.supervisions)
    recs.to_file(tmp_path / "x_recordings_dev.jsonl.gz")
    sups.to_file(tmp_path / "x_supervisions_dev.jsonl.gz")
    for name in ("x_recordings_dev.jsonl.gz", "x_supervisions_dev.jsonl.gz"):
        pair = load_source(tmp_path / name)
        assert sorted((round(c.start, 2), round(c.duration, 2), cut_fields(c)["label"]) for c in pair) == [
            (0.0, 1.0, "up"), (1.0, 1.0, "down")]
    (tmp_path / "x.wav").unlink()
    with pytest.raises(DataError, match="x.wav: file not found"):
        load_source(tmp_path / "cuts.jsonl.gz")


def test_several_sources_with_clashing_ids_stay_distinct(tmp_path):
    for d in ("a", "b"):
        write_wav(tmp_path / d / "same.wav", harmonic_tone(0.6))
    cuts = load_sources([tmp_path / "a", tmp_path / "b"], Problems())
    assert len(cuts) == 2 and len({c.id for c in cuts}) == 2


def test_pretrain_on_a_folder_with_bad_files_finishes_and_reports_them(tmp_path, capfd):
    from svqmae.tasks.pretrain import pretrain

    d = tmp_path / "data"
    for i in range(8):
        write_wav(d / f"good{i}.wav", harmonic_tone(1.0 + 0.1 * i, seed=i))
    (d / "corrupt.wav").write_bytes(b"RIFF" + bytes(100))
    x = harmonic_tone(1.0)
    x[5] = np.nan  # passes the header scan, fails when loaded for a batch
    sf.write(str(d / "nan.wav"), x, 16000, subtype="FLOAT")
    cfg = C.resolve("tiny", overrides=[*TINY_MODEL_OVERRIDES, "train.max_steps=3", "train.max_batch_seconds=20",
                                       "train.max_utt_seconds=2", "train.num_workers=0", "train.val_items=0",
                                       "train.log_every=1", "train.warmup_steps=1"])
    model = pretrain([str(d)], tmp_path / "run", cfg)
    assert (model / "model.safetensors").is_file()
    skipped = (tmp_path / "run" / "skipped_files.tsv").read_text()
    assert "corrupt.wav" in skipped and "nan.wav" in skipped and "NaN" in skipped
    err = capfd.readouterr().err
    assert "corrupt.wav" in err and "nan.wav" in err


def test_a_manifest_with_seconds_is_not_probed_and_a_large_one_is_lazy(tmp_path, monkeypatch):
    from svqmae.data import sources

    for i in range(4):
        write_wav(tmp_path / f"u{i}.wav", harmonic_tone(1.0, seed=i))
    (tmp_path / "bad.wav").write_bytes(b"RIFF" + bytes(100))
    (tmp_path / "m.tsv").write_text("path\tseconds\tlabel\n" + "".join(f"u{i}.wav\t1.000\tL{i}\n" for i in range(4))
                                    + "bad.wav\t1.0\tL9\n")
    monkeypatch.setattr(sources, "_probe_all", lambda *a: pytest.fail("probed"))
    problems = Problems()
    cuts = load_source(tmp_path / "m.tsv", problems)  # lenient: the bad file is found when it is read
    assert not cuts.is_lazy and len(cuts) == 5 and not len(problems)
    assert cut_fields(cuts[3])["label"] == "L3" and load_cut(cuts[0]).shape == (16000,)
    with pytest.raises(AudioError, match="bad.wav"):
        load_cut(cuts[4])
    monkeypatch.setattr(sources, "LAZY_MANIFEST_BYTES", 10)
    lazy = load_source(tmp_path / "m.tsv", Problems())
    assert lazy.is_lazy and [c.id for c in lazy] == [c.id for c in cuts] and len(lazy) == 5
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    assert load_source(tmp_path / "cuts.jsonl.gz", Problems()).is_lazy
    # an empty cell: that file alone is probed (as evaluation's strict read does), an unreadable one skipped
    (tmp_path / "gap.tsv").write_text("path\tseconds\nu0.wav\t\nbad.wav\t\nu1.wav\t1.0\n")
    gaps = Problems()
    got = list(load_source(tmp_path / "gap.tsv", gaps))
    assert [(c.id, round(c.duration, 3)) for c in got] == [("u0.wav", 1.0), ("u1.wav", 1.0)]
    assert len(gaps) == 1 and "gap.tsv: row 3" in gaps.items[0][1] and "bad.wav" in gaps.items[0][1]


def test_a_folder_is_probed_once_then_read_from_the_run_cache(tmp_path, monkeypatch):
    from svqmae.data import sources

    d = _bad_folder(tmp_path)
    first, problems = load_source(d, Problems(), cache=tmp_path / "cache"), Problems()
    monkeypatch.setattr(sources, "_probe_all", lambda *a: pytest.fail("probed again"))
    again = load_source(d, problems, cache=tmp_path / "cache")
    assert [c.to_dict() for c in again] == [c.to_dict() for c in first]
    assert sorted(p.split("/")[-1] for p, _ in problems.items) == ["corrupt.wav", "empty.flac"]
    write_wav(d / "new.wav", harmonic_tone(0.5))  # another file: the cache no longer covers the folder
    with pytest.raises(pytest.fail.Exception, match="probed again"):
        load_source(d, Problems(), cache=tmp_path / "cache")


def test_ranks_that_write_the_same_probe_cache_at_once_both_succeed(tmp_path, monkeypatch):
    """DDP ranks probe the same folder and write the same cache entry: each must use its own
    temporary file (a shared one made the slower rank's rename fail: CI, stop 17)."""
    import os
    import threading

    from svqmae.data import sources

    d = _bad_folder(tmp_path)
    barrier, real_replace = threading.Barrier(2, timeout=30), os.replace

    def replace_together(src, dst):  # both writers reach the rename before either renames
        barrier.wait()
        real_replace(src, dst)

    monkeypatch.setattr(sources.os, "replace", replace_together)
    results, errors = [], []

    def rank():
        try:
            results.append(load_source(d, Problems(), cache=tmp_path / "cache"))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [c.to_dict() for c in results[0]] == [c.to_dict() for c in results[1]]
    monkeypatch.setattr(sources.os, "replace", real_replace)
    monkeypatch.setattr(sources, "_probe_all", lambda *a: pytest.fail("probed again"))
    assert len(load_source(d, Problems(), cache=tmp_path / "cache")) == len(results[0])
    assert not [p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name]


def test_a_cache_that_cannot_be_written_only_costs_a_probe(tmp_path, caplog):
    d = _bad_folder(tmp_path)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    cuts = load_source(d, Problems(), cache=tmp_path / "cache")
    assert len(cuts) == 4 and "could not write the probe cache" in caplog.text
