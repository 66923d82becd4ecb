"""Family 1, audio files: every kind of broken or odd file x every command that reads audio.

A broken file is listed and skipped where the data is for training or output (``data check``,
``extract``, ``transcribe``) and is an error naming it in an evaluation set; an odd but valid file
(any rate, depth, channel count, a few milliseconds long) is read everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from tests.bad_inputs.conftest import assert_refused, run_cli, snapshot
from tests.conftest import harmonic_tone, write_wav


def _truncated(path, ext="wav"):
    sf.write(str(path), harmonic_tone(2.58, seed=7), 16000)
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 3])


def _float_with(value):
    def make(path):
        x = harmonic_tone(1.0, seed=8)
        x[4000:4010] = value
        sf.write(str(path), x, 16000, subtype="FLOAT")
    return make


BROKEN = {  # name -> (file name, writer)
    "empty": ("empty.wav", lambda p: p.write_bytes(b"")),
    "garbage": ("garbage.wav", lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000))),
    "header_only": ("header.wav", lambda p: sf.write(str(p), np.zeros(0, np.float32), 16000)),
    "truncated_wav": ("cut.wav", _truncated),
    "truncated_flac": ("cut.flac", lambda p: (sf.write(str(p), harmonic_tone(2.0, seed=9), 16000),
                                              p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))),
    "nan": ("nan.wav", _float_with(np.nan)),
    "inf": ("inf.wav", _float_with(np.inf)),
    "text_as_flac": ("notes.flac", lambda p: p.write_text("these are not samples\n")),
}

ODD = {  # valid files every command must read
    "8khz": ("narrow.wav", lambda p: write_wav(p, harmonic_tone(1.2, sr=8000, seed=3), 8000)),
    "44khz_24bit": ("cd.wav", lambda p: sf.write(str(p), harmonic_tone(1.1, sr=44100, seed=4), 44100,
                                                 subtype="PCM_24")),
    "six_channels": ("surround.wav", lambda p: sf.write(str(p), np.stack([harmonic_tone(1.0, seed=5)] * 6, 1),
                                                        16000)),
    "ogg": ("voice.ogg", lambda p: sf.write(str(p), harmonic_tone(1.3, seed=6), 16000, format="OGG",
                                            subtype="VORBIS")),
    "ten_ms": ("blip.wav", lambda p: write_wav(p, harmonic_tone(0.01, seed=2))),
}


def _folder(tmp_path, world, kind: dict, name: str):
    """Three good files of the world's audio plus the case's file."""
    folder = tmp_path / "data"
    for i in range(3):
        write_wav(folder / f"good{i}.wav", sf.read(str(world.audio / f"utt{i:02d}.wav"), dtype="float32")[0])
    fname, make = kind[name]
    make(folder / fname)
    return folder, folder / fname


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_data_check_lists_a_broken_file(tmp_path, capsys, world, name):
    folder, bad = _folder(tmp_path, world, BROKEN, name)
    before = snapshot(folder)
    res = run_cli(capsys, "data", "check", folder)
    assert res.code == 0 and "Traceback" not in res.err
    assert "3 usable utterances" in res.out and "problem files: 1" in res.out and str(bad) in res.out
    assert snapshot(folder) == before


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_extract_skips_and_lists_a_broken_file(tmp_path, capsys, world, name):
    folder, bad = _folder(tmp_path, world, BROKEN, name)
    res = run_cli(capsys, "extract", "--model", world.model, "--data", folder, "--out", tmp_path / "x", "--quiet",
                  "--workers", "0")
    assert res.code == 0, res.err
    index = (tmp_path / "x" / "index.tsv").read_text().splitlines()
    assert len(index) == 4 and not any(bad.name in row for row in index)
    assert str(bad) in (tmp_path / "x" / "skipped_files.tsv").read_text()


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_transcribe_skips_a_broken_file_and_goes_on(tmp_path, capsys, world, name):
    folder, bad = _folder(tmp_path, world, BROKEN, name)
    res = run_cli(capsys, "transcribe", "--model", world.recognizer, folder, "--out", tmp_path / "t.tsv")
    assert res.code == 0, res.err
    assert len(res.out.splitlines()) == 3 and bad.name not in res.out
    assert f"skipped {bad}" in res.err
    assert len((tmp_path / "t.tsv").read_text().splitlines()) == 4


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_file_in_an_evaluation_set_is_an_error_naming_it(tmp_path, capsys, world, name):
    folder, bad = _folder(tmp_path, world, BROKEN, name)
    rows = ["path\tlabel\tspeaker"] + [f"good{i}.wav\t{('lo', 'hi')[i % 2]}\ts{i}" for i in range(3)] + [f"{bad.name}\tlo\ts9"]
    (folder / "test.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"
    res = run_cli(capsys, "evaluate", "--model", world.model, "--task", "classify", "--train", world.labelled,
                  "--test", folder / "test.tsv", "--out", out, "--cache", tmp_path / "cache", "--epochs", "2",
                  "--lr", "1e-3", "--quiet")
    assert_refused(res, bad)
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("name", sorted(ODD))
def test_an_odd_but_valid_file_is_read_by_every_command(tmp_path, capsys, world, name):
    folder, odd = _folder(tmp_path, world, ODD, name)
    res = run_cli(capsys, "data", "check", folder)
    assert res.code == 0 and "4 usable utterances" in res.out and "problem files: 0" in res.out
    res = run_cli(capsys, "extract", "--model", world.model, "--data", folder, "--out", tmp_path / "x", "--quiet",
                  "--workers", "0")
    assert res.code == 0, res.err
    index = (tmp_path / "x" / "index.tsv").read_text()
    assert odd.stem in index and not (tmp_path / "x" / "skipped_files.tsv").exists()
    res = run_cli(capsys, "transcribe", "--model", world.recognizer, folder)
    assert res.code == 0 and odd.name in res.out and "skipped" not in res.err
