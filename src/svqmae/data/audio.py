"""Audio I/O: any file libsndfile reads (wav, flac, ogg, mp3, ...), any bit depth, any rate, any
channel count -> mono float32 at the target rate. Every problem is an ``AudioError`` naming the file:
missing, unreadable, empty, truncated (the header promises more than the file holds, or the decoder
stops early) or holding NaN/Inf samples."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".sph")

# libsndfile notes a short audio chunk in its log as e.g. "data : 64000 (should be 31960)"
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*\d+\s*\(should be \d+\)", re.MULTILINE)


_PCM_CONTAINERS = ("WAV", "WAVEX", "W64", "RF64", "AIFF", "AU", "CAF", "RAW", "NIST")


class AudioError(RuntimeError):
    """An unreadable, empty, truncated or non-finite audio file; the message names it."""


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says."""

    path: str
    sample_rate: int
    frames: int
    channels: int
    format: str  # container, e.g. WAV, FLAC
    subtype: str  # sample encoding, e.g. PCM_16, PCM_24, FLOAT

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def probe(path: str | Path) -> AudioInfo:
    """Read the header only; raise ``AudioError`` for a missing, unreadable, empty or (WAV/AIFF)
    truncated file."""
    p = _existing(path)
    try:
        info = sf.info(str(p))
    except Exception as e:  # libsndfile's message says what is wrong
        raise AudioError(f"{p}: unreadable audio ({_short(e)})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{p}: empty audio (0 samples)")
    if _SHORT_CHUNK.search(info.extra_info or ""):
        raise AudioError(f"{p}: truncated audio (the file is shorter than its header says)")
    return AudioInfo(str(p), int(info.samplerate), int(info.frames), int(info.channels), info.format, info.subtype)


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """(sample_rate, num_frames, channels) from the header, without decoding."""
    i = probe(path)
    return i.sample_rate, i.frames, i.channels


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    if sr_in == sr_out:
        return x
    return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def read_audio(
    path: str | Path, sample_rate: int = 16000, offset: float = 0.0, duration: float | None = None
) -> np.ndarray:
    """Read ``path`` (optionally a segment, in seconds) as mono float32 at ``sample_rate``."""
    p = _existing(path)
    return _decode(str(p), p, sample_rate, offset, duration)


def read_audio_bytes(data: bytes, name: str, sample_rate: int = 16000, offset: float = 0.0,
                     duration: float | None = None) -> np.ndarray:
    """Like :func:`read_audio` for an encoded file held in memory (e.g. a member of a Shar tar);
    ``name`` is what an ``AudioError`` calls it."""
    if not data:
        raise AudioError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, sample_rate, offset, duration)


def _decode(src, p, sample_rate: int, offset: float, duration: float | None) -> np.ndarray:
    """``src``: a path string or a binary file object; ``p`` names it in errors."""
    try:
        with sf.SoundFile(src) as f:
            sr, total, fmt = f.samplerate, f.frames, f.format
            if total == 0:
                raise AudioError(f"{p}: empty audio (0 samples)")
            start = min(int(round(offset * sr)), total)
            if start:
                f.seek(start)
            want = total - start if duration is None else min(int(round(duration * sr)), total - start)
            x = f.read(want, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"{p}: unreadable audio ({_short(e)})") from None
    if x.shape[0] == 0:
        raise AudioError(f"{p}: empty audio (no samples in the requested segment)")
    # compressed formats may report a frame count a decoder block or so off; PCM must be exact
    if x.shape[0] < want - (0 if fmt in _PCM_CONTAINERS else 4096):
        raise AudioError(f"{p}: truncated audio (decoded {x.shape[0]} of {want} samples)")
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]  # mono down-mix
    if not np.isfinite(x).all():
        raise AudioError(f"{p}: audio contains NaN or Inf samples")
    return np.ascontiguousarray(resample(x, sr, sample_rate))


def check_audio(path: str | Path) -> AudioInfo:
    """Header and a full decode: the strictest test a file can pass. Returns its header info."""
    info = probe(path)
    read_audio(path, info.sample_rate)
    return info


def write_audio(path: str | Path, x: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> Path:
    """Write float audio in [-1, 1] (clipped) to ``path``; the format follows the extension."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(p), np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0), sample_rate, subtype=subtype)
    return p


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"{p}: file not found")
    if p.stat().st_size == 0:
        raise AudioError(f"{p}: empty file (0 bytes)")
    return p


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else e.__class__.__name__
    return msg[:200]
