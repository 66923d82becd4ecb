"""Shared test helpers: synthetic speech-like audio written to tmp_path (never real corpora)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from svqmae.model import save_model

torch.set_num_threads(2)


def harmonic_tone(seconds: float, sr: int = 16000, f0: float = 150.0, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: harmonics of a wobbling f0 with a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    n = int(sr * seconds)
    t = np.arange(n) / sr
    f = f0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)) ** 2 + 0.01 * rng.standard_normal(n)
    return (0.3 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def write_wav(path: Path, x: np.ndarray, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr)
    return path


@pytest.fixture
def audio_folder(tmp_path: Path) -> Path:
    """12 short speech-like 16 kHz wav files in tmp_path/audio."""
    folder = tmp_path / "audio"
    for i in range(12):
        write_wav(folder / f"utt{i:02d}.wav", harmonic_tone(1.0 + 0.25 * (i % 4), f0=100 + 15 * i, seed=i))
    return folder


def write_labelled_set(folder: Path, f0s: dict[str, float], speakers: list[str], per_class: int = 3,
                       seconds: float = 0.6, sr: int = 16000, seed: int = 0) -> Path:
    """A labelled manifest (``folder/manifest.tsv``: path, seconds, speaker, label, text) whose classes
    differ in pitch: label L is a harmonic tone near ``f0s[L]`` Hz, each speaker shifting it slightly."""
    rng = np.random.default_rng(seed)
    rows = ["path\tseconds\tspeaker\tlabel\ttext"]
    for s, spk in enumerate(speakers):
        for label, f0 in f0s.items():
            for i in range(per_class):
                rel = f"audio/{spk}_{label}_{i}.wav"
                f = f0 * (1 + 0.04 * (s - len(speakers) / 2) / max(len(speakers), 1)) * rng.uniform(0.97, 1.03)
                write_wav(folder / rel, harmonic_tone(seconds, sr, f, seed=int(rng.integers(1 << 30))), sr)
                rows.append(f"{rel}\t{seconds}\t{spk}\t{label}\t{label}")
    (folder / "manifest.tsv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.tsv"


LETTER_F0 = {"a": 220.0, "b": 330.0, "c": 495.0, "d": 740.0}


def write_spelled_set(folder: Path, n: int = 16, seed: int = 0, letters: dict[str, float] | None = None,
                      texts: list[str] | None = None, sr: int = 16000) -> Path:
    """An ASR manifest (``folder/manifest.tsv``: path, seconds, speaker, text): each utterance spells a
    short random word over ``letters``, one harmonic tone (0.24 s, pitch per letter) per character with
    short pauses, so that a tiny CTC model can learn it in a few dozen steps. ``texts`` fixes the
    transcripts (their characters must be in ``letters``, the manifest may differ: e.g. an empty one)."""
    letters = letters or LETTER_F0
    rng = np.random.default_rng(seed)
    rows = ["path\tseconds\tspeaker\ttext"]
    keys = list(letters)
    for i in range(n):
        text = texts[i] if texts is not None else "".join(rng.choice(keys, size=int(rng.integers(2, 5))))
        spoken = [ch for ch in text if ch in letters] or keys[:1]
        pause = np.zeros(int(0.08 * sr), np.float32)
        parts = [pause]
        for ch in spoken:
            parts += [harmonic_tone(0.24, sr, letters[ch], seed=int(rng.integers(1 << 30))), pause]
        x = np.concatenate(parts)
        rel = f"audio/utt{i:03d}.wav"
        write_wav(folder / rel, x, sr)
        rows.append(f"{rel}\t{len(x) / sr:.3f}\tspk{i % 2}\t{text}")
    (folder / "manifest.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "manifest.tsv"


# fine-tuning settings that make a tiny CTC model learn in a few dozen steps on write_spelled_set data
FINETUNE_FAST = ["train.max_batch_seconds=8", "train.max_utt_seconds=4", "train.lr=3e-3", "train.log_every=5",
                 "train.val_every=20", "train.ckpt_every_steps=10", "train.num_workers=0", "ctc.freeze_steps=6",
                 "ctc.encoder_lr_ratio=1.0", "ctc.reinit_top=0",
                 "specaug.freq_mask_width=8"]

TINY_MODEL_OVERRIDES = ["model.encoder.layers=2", "model.encoder.dim=64", "model.encoder.heads=2",
                        "model.encoder.ffn_dim=128", "model.decoder.layers=1", "model.decoder.dim=32",
                        "model.decoder.heads=2", "model.decoder.ffn_dim=64", "model.quantizer.codebook_size=32"]


def tiny_model(seed: int = 0):
    """A randomly initialized 2-layer x 64-wide SVQMAE (with decoder) and its resolved config."""
    from svqmae import config as C
    from svqmae.model import SVQMAE

    cfg = C.resolve("tiny", overrides=TINY_MODEL_OVERRIDES)
    torch.manual_seed(seed)
    return SVQMAE(cfg.model).eval(), cfg


def waves_batch(seconds=(1.0, 0.7), seed=0):
    """A zero-padded batch of harmonic tones of ``seconds`` and its lengths."""
    xs = [torch.from_numpy(harmonic_tone(s, f0=110 + 40 * i, seed=seed + i)) for i, s in enumerate(seconds)]
    lengths = torch.tensor([len(x) for x in xs])
    return torch.nn.utils.rnn.pad_sequence(xs, batch_first=True), lengths


def extract_no_grad(model, waves, lengths):
    with torch.no_grad():
        return model.extract(waves, lengths)


@pytest.fixture
def model_dir(tmp_path):
    """A saved tiny model folder (with a card and a figure, as ``svqmae pretrain`` writes it) and the model."""
    model, cfg = tiny_model(seed=1)
    fig = tmp_path / "plots" / "pretrain.png"
    fig.parent.mkdir()
    fig.write_bytes(b"\x89PNG\r\n\x1a\n")  # any image file: save_pretrained copies it next to the card
    # as svqmae pretrain saves its model
    save_model(model, cfg, tmp_path / "run" / "model",
               card={"training data": "/data/fsdd", "steps": 30, "final training loss": "5.1"}, figures=[fig])
    return tmp_path / "run" / "model", model


@pytest.fixture(scope="module")
def one_thread():
    """Models this small gain nothing from intra-op threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
