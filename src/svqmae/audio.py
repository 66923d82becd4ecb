"""Audio I/O: any file libsndfile reads (wav, flac, ogg, mp3, ...), any bit depth, any rate, any
channel count -> mono float32 at the target rate. Every problem is an ``AudioError`` naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".sph")


class AudioError(RuntimeError):
    """An unreadable, empty, truncated or non-finite audio file; the message names it."""


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """(sample_rate, num_frames, channels) from the header, without decoding."""
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"{p}: file not found")
    try:
        info = sf.info(str(p))
    except Exception as e:  # libsndfile's message says what is wrong
        raise AudioError(f"{p}: unreadable audio ({_short(e)})") from None
    if info.frames <= 0:
        raise AudioError(f"{p}: empty audio (0 samples)")
    return int(info.samplerate), int(info.frames), int(info.channels)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return x
    return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def read_audio(
    path: str | Path, sample_rate: int = 16000, offset: float = 0.0, duration: float | None = None
) -> np.ndarray:
    """Read ``path`` (optionally a segment, in seconds) as mono float32 at ``sample_rate``."""
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"{p}: file not found")
    try:
        with sf.SoundFile(str(p)) as f:
            sr = f.samplerate
            if f.frames == 0:
                raise AudioError(f"{p}: empty audio (0 samples)")
            start = int(round(offset * sr))
            if start:
                f.seek(min(start, f.frames))
            n = -1 if duration is None else int(round(duration * sr))
            x = f.read(n, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"{p}: unreadable audio ({_short(e)})") from None
    if x.shape[0] == 0:
        raise AudioError(f"{p}: empty audio (no samples in the requested segment)")
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]  # mono down-mix
    if not np.isfinite(x).all():
        raise AudioError(f"{p}: audio contains NaN or Inf samples")
    return np.ascontiguousarray(resample(x, sr, sample_rate))


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else e.__class__.__name__
    return msg[:200]
