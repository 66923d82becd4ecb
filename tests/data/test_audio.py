"""svqmae.audio: any rate, channel count and bit depth in; every bad file is an AudioError naming it."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from svqmae.data.audio import AudioError, check_audio, probe, read_audio, write_audio
from tests.conftest import harmonic_tone


def test_8khz_stereo_is_downmixed_and_resampled(tmp_path):
    left = harmonic_tone(1.0, sr=8000, f0=200, seed=1)
    stereo = np.stack([left, 0.5 * left], axis=1)
    p = tmp_path / "st.wav"
    sf.write(str(p), stereo, 8000)
    x = read_audio(p, 16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 16000) <= 2
    # the down-mix is the channel mean: 0.75 of the left channel's level
    assert np.sqrt(np.mean(x**2)) == pytest.approx(0.75 * np.sqrt(np.mean(left**2)), rel=0.03)
    info = probe(p)
    assert (info.sample_rate, info.channels, info.frames) == (8000, 2, 8000)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_any_bit_depth_reads_the_same_signal(tmp_path, subtype):
    x = harmonic_tone(0.5, seed=2)
    p = tmp_path / f"{subtype}.wav"
    sf.write(str(p), x, 16000, subtype=subtype)
    assert np.abs(read_audio(p) - x).max() < 1e-3


def test_segment_reads_offset_and_duration(tmp_path):
    x = np.arange(16000, dtype=np.float32) / 16000
    p = write_audio(tmp_path / "ramp.wav", x, 16000, subtype="FLOAT")
    y = read_audio(p, 16000, offset=0.25, duration=0.5)
    assert len(y) == 8000 and y[0] == pytest.approx(0.25, abs=1e-4)
    # past the end: what there is
    assert len(read_audio(p, 16000, offset=0.75, duration=5.0)) == 4000


def _truncated_wav(tmp_path):
    p = write_audio(tmp_path / "trunc.wav", harmonic_tone(1.0), 16000)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _truncated_flac(tmp_path):
    p = write_audio(tmp_path / "trunc.flac", np.random.default_rng(0).standard_normal(32000) * 0.1, 16000)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _nan(tmp_path):
    x = harmonic_tone(0.5)
    x[100] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(str(p), x, 16000, subtype="FLOAT")
    return p


def _empty(tmp_path):
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    return p


def _no_samples(tmp_path):
    p = tmp_path / "nosamples.wav"
    sf.write(str(p), np.zeros(0, np.float32), 16000)
    return p


def _corrupt(tmp_path):
    p = tmp_path / "corrupt.wav"
    p.write_bytes(b"RIFF" + bytes(range(256)) * 4)
    return p


@pytest.mark.parametrize("make, words", [
    (_truncated_wav, "truncated"), (_truncated_flac, "unreadable"), (_nan, "NaN"), (_empty, "empty"),
    (_no_samples, "empty"), (_corrupt, "unreadable"),
    (lambda tmp: tmp / "missing.wav", "not found"),
])
def test_bad_files_are_errors_naming_the_file(tmp_path, make, words):
    p = make(tmp_path)
    with pytest.raises(AudioError) as e:
        check_audio(p)
    msg = str(e.value)
    assert str(p) in msg and words in msg and "\n" not in msg


def test_truncated_wav_is_caught_by_the_header_probe(tmp_path):
    with pytest.raises(AudioError, match="truncated"):
        probe(_truncated_wav(tmp_path))


def test_write_audio_clips_and_round_trips(tmp_path):
    p = write_audio(tmp_path / "sub" / "x.flac", np.array([0.5, 2.0, -3.0], np.float32), 16000)
    y = read_audio(p)
    assert y[0] == pytest.approx(0.5, abs=1e-4) and y[1] == pytest.approx(1.0, abs=1e-3) and y[2] == -1.0
