"""ASR fine-tuning with CTC, transcription and scoring: ``svqmae finetune``, ``transcribe``, ``score``.

The recognizer is the pre-trained encoder (front end -> token embedding -> Transformer) plus a linear
CTC head over character or sentencepiece units (see :mod:`svqmae.text`). Fine-tuning runs on the
pre-training engine (:mod:`svqmae.train`: Lightning, atomic periodic checkpoints, resume by rerunning
the same command, bf16 on GPU, DDP, accumulation, clipping), with:

* the encoder frozen (only the head trains) for the first ``ctc.freeze_steps`` optimizer steps;
* SpecAugment-style time and frequency masking of the filterbank tokens, between the front end and
  the token embedding;
* a tri-stage learning-rate schedule (warm-up, hold, exponential decay; wav2vec 2.0's fine-tuning
  recipe) or the pre-training warm-up + cosine decay.

``--model random --preset P`` trains the same architecture from scratch, and ``--model fbank --preset P``
trains a BiLSTM on the same stacked filterbank tokens (the benchmark's feature baseline).

The output ``DIR/model/`` is self-contained and holds no pickled code: ``config.json`` and
``model.safetensors`` (``svqmae.load`` reads them as the fine-tuned encoder; the CTC head's weights
ride along), ``ctc.json`` (fine-tuning config, backbone and units) and ``units.txt`` / ``units.model``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from . import config as C
from .api import CheckpointError, save_model
from .data import DataError, Problems, WaveformBatches, batch_loader, load_cut, load_source
from .decode import Decoder, greedy
from .masking import padding_mask
from .model import SVQMAE, FilterbankFrontend, _init_weights
from .resilience import NonFiniteGuard, StopSignals
from .text import build_units, load_units, normalize, words
from .train import (
    PeriodicCheckpoint,
    _fmt,
    latest_checkpoint,
    log,
    lr_lambda,
    quiet_lightning,
    take_step_output,
    trainer_kwargs,
)

CTC_FORMAT = "svqmae-ctc"
BACKBONES = ("svqmae", "lstm")

# --------------------------------------------------------------------------- configuration


@dataclass
class UnitsConfig:
    kind: str = "char"  # "char": characters of the training transcripts | "bpe": a sentencepiece model
    vocab_size: int = 300  # bpe only (an upper bound on tiny data)
    min_count: int = 1  # char only: characters seen fewer times in training map to <unk>
    lowercase: bool = True


@dataclass
class SpecAugConfig:
    time_mask_prob: float = 0.04  # masks per token (each starts a span of up to time_mask_width tokens)
    time_mask_width: int = 5  # tokens (5 x 40 ms = 0.2 s at 25 Hz)
    freq_masks: int = 2  # masks per utterance over the mel bins (same bins in every stacked frame)
    freq_mask_width: int = 15  # mel bins, at most


@dataclass
class CTCConfig:
    freeze_steps: int = 1000  # the encoder is frozen (head only) for the first N steps; pre-trained models only
    schedule: str = "tristage"  # "tristage" (warm-up, hold, exponential decay) | "cosine" (train.warmup_steps)
    stages: tuple[float, float, float] = (0.1, 0.4, 0.5)  # tri-stage shares of max_steps
    final_lr_ratio: float = 0.05  # tri-stage: lr at the end, as a share of train.lr
    head_dropout: float = 0.1  # dropout on the encoder output before the CTC head
    upsample: int = 1  # CTC frames per token: 2 doubles the label rate (long transcripts at 25 Hz)
    lstm_layers: int = 3  # the fbank baseline's BiLSTM
    lstm_dim: int = 0  # its width (both directions); 0: the preset's encoder width


@dataclass
class FinetuneConfig:
    preset: str = "base"
    model: C.ModelConfig = field(default_factory=C.ModelConfig)
    train: C.TrainConfig = field(default_factory=C.TrainConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)


# fine-tuning defaults per preset (the architecture comes from the pre-trained model, or from the
# pre-training preset of the same name for --model random/fbank)
FT_PRESETS: dict[str, dict] = {
    "tiny": {
        # small batches: more updates per CPU minute
        "train": dict(lr=5e-4, warmup_steps=50, max_steps=2000, max_batch_seconds=60.0, max_utt_seconds=20.0,
                      val_every=200, log_every=10, ckpt_every_steps=200,
                      ckpt_every_minutes=2.0, num_workers=1, weight_decay=0.0),
        "ctc": dict(freeze_steps=50),
    },
    "small": {
        "train": dict(lr=1e-4, warmup_steps=500, max_steps=20_000, max_batch_seconds=200.0, max_utt_seconds=30.0,
                      val_every=1000, ckpt_every_steps=1000, weight_decay=0.0),
        "ctc": dict(freeze_steps=1000),
    },
    # wav2vec 2.0 BASE's fine-tuning recipe (100 h): lr 3e-5..5e-5, 200 s of audio per GPU, tri-stage
    "base": {
        "train": dict(lr=5e-5, warmup_steps=2000, max_steps=40_000, max_batch_seconds=200.0, max_utt_seconds=30.0,
                      val_every=1000, ckpt_every_steps=1000, weight_decay=0.0),
        "ctc": dict(freeze_steps=5000),
    },
}


def resolve_finetune(preset: str | None = None, model_cfg: C.Config | None = None,
                     yaml_files: list[str] | tuple = (), overrides: list[str] | tuple = ()) -> FinetuneConfig:
    """defaults -> fine-tuning preset (+ the architecture: ``model_cfg``'s, else the pre-training
    preset's) -> YAML files -> ``key=value`` overrides. With a pre-trained ``model_cfg`` only the
    dropout of the architecture may be overridden."""
    cfg = FinetuneConfig()
    docs = [(str(f), C.load_yaml(f)) for f in yaml_files]
    name = (model_cfg.preset if model_cfg is not None else None) or preset or next(
        (d["preset"] for _, d in reversed(docs) if "preset" in d), None) or "base"
    if name not in C.PRESETS:
        raise C.ConfigError(f"unknown preset '{name}' (choose from {', '.join(C.PRESETS)})")
    cfg.preset = name
    if model_cfg is not None:
        cfg.model = copy.deepcopy(model_cfg.model)
    else:
        arch = C.Config()
        C.apply_preset(arch, name)
        cfg.model = arch.model
    for k, v in FT_PRESETS.get(name, {}).items():
        C._set_path(cfg, k, v, f"fine-tuning preset {name}")
    for src, d in docs:
        for k, v in d.items():
            if k != "preset":
                C._set_path(cfg, k, v, src)
    for item in overrides:
        if "=" not in item:
            raise C.ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        C._set_path(cfg, k.strip(), yaml.safe_load(v), f"--set {k.strip()}")
    if model_cfg is not None:
        changed = [d for d in _arch_diff(model_cfg.model, cfg.model)]
        if changed:
            raise C.ConfigError("the architecture comes from the pre-trained model and cannot be changed "
                                "(only dropout can); differing: " + "; ".join(changed))
    validate_finetune(cfg, "config")
    return cfg


def _arch_diff(a: C.ModelConfig, b: C.ModelConfig) -> list[str]:
    return [d for d in C.diff(C.Config(model=a), C.Config(model=b), "model") if ".dropout:" not in d]


def validate_finetune(cfg: FinetuneConfig, source: str) -> None:
    C.validate(cfg, source)  # the model and train sections, as in pre-training

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise C.ConfigError(f"{source}: {msg}")

    u, s, c = cfg.units, cfg.specaug, cfg.ctc
    need(u.kind in ("char", "bpe"), f"units.kind must be char or bpe, got {u.kind!r}")
    need(u.vocab_size >= 4, "units.vocab_size must be >= 4")
    need(c.schedule in ("tristage", "cosine"), f"ctc.schedule must be tristage or cosine, got {c.schedule!r}")
    need(all(x >= 0 for x in c.stages) and abs(sum(c.stages) - 1) < 1e-6, "ctc.stages must be 3 shares summing to 1")
    need(0 < c.final_lr_ratio <= 1, "ctc.final_lr_ratio must be in (0, 1]")
    need(c.upsample >= 1, "ctc.upsample must be >= 1")
    need(0 <= s.time_mask_prob < 1 and s.time_mask_width >= 1, "specaug: time_mask_prob in [0, 1), width >= 1")
    need(0 <= s.freq_mask_width < cfg.model.features.n_mels, "specaug.freq_mask_width must be < model.features.n_mels")


def tristage(cfg: FinetuneConfig):
    """wav2vec 2.0 fine-tuning schedule: linear warm-up from 1% of lr, hold, exponential decay."""
    n = cfg.train.max_steps
    warm, hold, _ = (int(x * n) for x in cfg.ctc.stages)
    decay = max(1, n - warm - hold)
    floor = cfg.ctc.final_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return 0.01 + 0.99 * (step + 1) / warm
        if step < warm + hold:
            return 1.0
        return max(floor, math.exp(math.log(floor) * min(1.0, (step - warm - hold) / decay)))

    return f


# --------------------------------------------------------------------------- the model


def spec_augment(tokens: torch.Tensor, tok_len: torch.Tensor, s: SpecAugConfig, stack: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Zero (= the utterance mean; features are normalised) time spans of tokens and bands of mel bins.
    tokens: (B, T, stack*F); masks are drawn inside each utterance's real length only."""
    B, T, Cdim = tokens.shape
    Fb = Cdim // stack
    keep_t = torch.ones(B, T, dtype=torch.bool)
    keep_f = torch.ones(B, Fb, dtype=torch.bool)
    for b, n in enumerate(tok_len.tolist()):
        for _ in range(int(round(s.time_mask_prob * n))):
            w = int(torch.randint(1, s.time_mask_width + 1, (1,), generator=generator))
            t0 = int(torch.randint(0, max(1, n - w + 1), (1,), generator=generator))
            keep_t[b, t0:t0 + w] = False
        for _ in range(s.freq_masks if s.freq_mask_width > 0 else 0):
            w = int(torch.randint(0, s.freq_mask_width + 1, (1,), generator=generator))
            f0 = int(torch.randint(0, Fb - w + 1, (1,), generator=generator))
            keep_f[b, f0:f0 + w] = False
    keep = keep_t[:, :, None, None] & keep_f[:, None, None, :]  # (B, T, 1, F)
    return (tokens.view(B, T, stack, Fb) * keep.to(tokens.device, tokens.dtype)).view(B, T, Cdim)


class CTCModel(nn.Module):
    """Front end -> backbone -> linear CTC head. For the ``svqmae`` backbone the parameter names are
    those of :class:`SVQMAE` without its decoder (plus ``ctc_head``), so the saved weights also load
    as a plain encoder with ``svqmae.load``."""

    def __init__(self, cfg: FinetuneConfig, vocab_size: int, backbone: str = "svqmae",
                 encoder: SVQMAE | None = None):
        super().__init__()
        if backbone not in BACKBONES:
            raise C.ConfigError(f"unknown backbone {backbone!r} (choose from {', '.join(BACKBONES)})")
        self.cfg, self.backbone, self.vocab_size = cfg, backbone, vocab_size
        f = cfg.model.features
        if backbone == "svqmae":
            enc = SVQMAE(cfg.model).drop_decoder()
            if encoder is not None:
                enc.load_state_dict(encoder.state_dict())
            self.frontend, self.quantizer, self.embed, self.encoder = enc.frontend, enc.quantizer, enc.embed, enc.encoder
            dim = cfg.model.encoder.dim
        else:
            dim = cfg.ctc.lstm_dim or cfg.model.encoder.dim
            self.frontend = FilterbankFrontend(f)
            self.lstm_in = nn.Sequential(nn.Linear(f.n_mels * f.stack, dim), nn.LayerNorm(dim))
            self.lstm = nn.LSTM(dim, dim // 2, num_layers=cfg.ctc.lstm_layers, batch_first=True,
                                bidirectional=True, dropout=cfg.model.encoder.dropout)
        self.head_drop = nn.Dropout(cfg.ctc.head_dropout)
        self.ctc_head = nn.Linear(dim, vocab_size * cfg.ctc.upsample)
        _init_weights(self.ctc_head)

    @property
    def downsample_rate(self) -> int:
        return self.frontend.hop * self.cfg.model.features.stack // self.cfg.ctc.upsample

    def encoder_parameters(self):
        """What ``ctc.freeze_steps`` freezes: everything before the head."""
        return [p for n, p in self.named_parameters() if not n.startswith("ctc_head")]

    def frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """CTC output frames for utterances of ``num_samples`` samples."""
        return self.frontend.num_tokens(num_samples) * self.cfg.ctc.upsample

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None,
                freeze: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """waves (B, S) 16 kHz, lengths (B,) samples -> CTC log-probabilities (B, T*k, V) float32 and (B,)
        frame counts. ``generator`` turns SpecAugment on; ``freeze`` runs the backbone without gradients."""
        tokens, tok_len = self.frontend(waves, lengths)  # (B, T, C)
        if generator is not None:
            tokens = spec_augment(tokens, tok_len, self.cfg.specaug, self.cfg.model.features.stack, generator)
        B, T, _ = tokens.shape
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
            if self.backbone == "svqmae":
                pos = torch.arange(T, device=tokens.device).expand(B, T)
                h = self.encoder(self.embed(tokens), pos, ~padding_mask(tok_len, T))[-1]  # (B, T, D)
            else:
                packed = nn.utils.rnn.pack_padded_sequence(self.lstm_in(tokens), tok_len.clamp_min(1).cpu(),
                                                           batch_first=True, enforce_sorted=False)
                h = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=T)[0]
        k = self.cfg.ctc.upsample
        logits = self.ctc_head(self.head_drop(h)).view(B, T * k, self.vocab_size)
        return logits.float().log_softmax(-1), tok_len * k


# --------------------------------------------------------------------------- saving and loading


@dataclass
class Recognizer:
    """A loaded fine-tuned model: ``model`` (eval mode), its ``units`` and where it came from."""

    model: CTCModel
    units: object
    cfg: FinetuneConfig
    path: Path


def save_recognizer(model: CTCModel, units, cfg: FinetuneConfig, out: Path, card: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pcfg = C.Config(preset=cfg.preset, model=cfg.model, train=cfg.train)
    save_model(model, pcfg, out, {"task": f"CTC speech recognition ({units.kind} units, {len(units)} outputs)",
                                  "backbone": model.backbone, **card})
    units_file = units.save(out)
    meta = {"format": CTC_FORMAT, "backbone": model.backbone, "vocab_size": len(units),
            "units": {"kind": units.kind, "file": units_file, "lowercase": units.lowercase},
            "finetune": C.to_dict(cfg), "card": card}
    tmp = out / ".ctc.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    tmp.replace(out / "ctc.json")  # written last: its presence means the folder is complete
    return out


def _finetune_config_from_dict(d: dict, source: str) -> FinetuneConfig:
    cfg = FinetuneConfig()
    C.apply_saved(cfg, d, source)
    validate_finetune(cfg, source)
    return cfg


def load_recognizer(path: str | Path, device: str | torch.device = "cpu") -> Recognizer:
    """A fine-tuned model: its ``model/`` folder or the fine-tuning run DIR."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: model path not found")
    if (p / "model" / "ctc.json").is_file():
        p = p / "model"
    meta_file = p / "ctc.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{p}: not a fine-tuned svqmae recognizer (no ctc.json; "
                              "make one with `svqmae finetune`)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable ({e.__class__.__name__})") from None
    if meta.get("format") != CTC_FORMAT:
        raise CheckpointError(f"{meta_file}: not an svqmae recognizer (format={meta.get('format')!r})")
    cfg = _finetune_config_from_dict(meta["finetune"], str(meta_file))
    try:
        units = load_units(p, meta["units"]["kind"], meta["units"].get("lowercase", True))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = CTCModel(cfg, len(units), meta.get("backbone", "svqmae"))
    try:
        state = load_file(str(p / "model.safetensors"))
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(f"{p / 'model.safetensors'}: weights do not match ctc.json ({str(e)[:160]})") from None
    return Recognizer(model.to(device).eval(), units, cfg, p)


# --------------------------------------------------------------------------- data


def prepare_cuts(cuts: list, sources: list[str], units, model: CTCModel, cfg: FinetuneConfig, role: str,
                 max_seconds: float | None = None) -> CutSet:
    """Normalise the transcripts of ``cuts`` (loaded from ``sources``) and attach their unit ids
    (``custom['units']``); skip (with counts in the log) what cannot be used for CTC: no/empty
    transcript, too long, or a transcript that needs more CTC frames than the audio gives."""
    skipped: Counter = Counter()
    unseen: Counter = Counter()
    kept = []
    sr = cfg.model.features.sample_rate
    for cut in cuts:
        sup = cut.supervisions[0] if cut.supervisions else None
        text = normalize(sup.text or "", units.lowercase) if sup is not None else ""
        if not text:
            skipped["empty or missing transcript"] += 1
            continue
        if max_seconds and cut.duration > max_seconds:
            skipped[f"longer than train.max_utt_seconds={max_seconds:g}"] += 1
            continue
        miss = units.unseen(text)
        unseen.update(miss)
        ids = units.encode(text)
        need = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))  # a blank between repeats
        have = int(model.frames(torch.tensor(round(cut.duration * sr))))
        if need > have:
            skipped["transcript needs more CTC frames than the audio has"] += 1
            continue
        sup.custom = dict(sup.custom or {}, units=ids, ref=text)
        kept.append(cut)
    n_src = ", ".join(map(str, sources))
    for reason, n in skipped.items():
        hint = (" (raise ctc.upsample, e.g. --set ctc.upsample=2, or use --units bpe)"
                if "CTC frames" in reason else "")
        log(f"{role}: skipped {n} utterance(s): {reason}{hint}")
    if unseen:
        log(f"{role}: {sum(unseen.values())} character(s) unseen in the training transcripts map to <unk>: "
            + " ".join(f"{ch!r}x{n}" for ch, n in unseen.most_common(20)))
    if not kept:
        raise DataError(f"{n_src}: no usable {role} utterance (need audio with a non-empty `text` transcript; "
                        f"skipped: {dict(skipped) or 'none'})")
    return CutSet.from_cuts(kept)


class CTCBatches(WaveformBatches):
    """Waveform batches (see :class:`svqmae.data.WaveformBatches`) plus the CTC targets:
    ``targets`` (sum of lengths,) flat unit ids, ``target_lengths`` (B,), ``refs`` normalised texts."""

    def __getitem__(self, item):
        batch = super().__getitem__(item)
        cuts = item[2] if isinstance(item, tuple) else item
        sups = {c.id: c.supervisions[0].custom for c in cuts}
        ids = [sups[i]["units"] for i in batch["ids"]]
        batch["targets"] = torch.tensor([u for x in ids for u in x], dtype=torch.long)
        batch["target_lengths"] = torch.tensor([len(x) for x in ids], dtype=torch.long)
        batch["refs"] = [sups[i]["ref"] for i in batch["ids"]]
        return batch


def ctc_loader(cuts: CutSet, t: C.TrainConfig, shuffle: bool,
               start: tuple[int, int] | None = None) -> torch.utils.data.DataLoader:
    """Duration-bucketed dynamic batches (DDP-aware through lhotse), never cropped (CTC needs the
    whole transcript). One pass, or with ``start`` the endless training stream from that (epoch,
    batch index) (see ``EndlessBatches``)."""
    if shuffle:
        sampler = DynamicBucketingSampler(cuts, max_duration=t.max_batch_seconds, shuffle=True, seed=t.seed,
                                          num_buckets=max(1, min(t.num_buckets, len(cuts) // 2)), drop_last=False)
    else:
        sampler = DynamicCutSampler(cuts, max_duration=t.max_batch_seconds, shuffle=False)
    return batch_loader(CTCBatches(seed=t.seed), sampler, t.num_workers if shuffle else 0, start)


# --------------------------------------------------------------------------- the lightning module


class FinetuneModule(pl.LightningModule):
    def __init__(self, cfg: FinetuneConfig, model: CTCModel, units, freeze_steps: int):
        super().__init__()
        self.cfg, self.model, self.units, self.freeze_steps = cfg, model, units, freeze_steps
        self.data_pos = (0, -1)
        self.val_errors = self.val_chars = 0.0

    def _generator(self, *keys: int) -> torch.Generator:
        seed = self.cfg.train.seed
        for k in keys:
            seed = (seed * 1_000_003 + k) % (2**62)
        return torch.Generator().manual_seed(seed)

    def _loss(self, batch, generator, freeze=False):
        lp, frames = self.model(batch["waves"], batch["lengths"], generator, freeze)
        loss = F.ctc_loss(lp.transpose(0, 1), batch["targets"], frames, batch["target_lengths"],
                          blank=0, reduction="mean", zero_infinity=True)
        return loss, lp, frames

    def training_step(self, batch, batch_idx):
        step, rank = self.global_step, self.global_rank
        micro = batch_idx % self.cfg.train.accumulate
        torch.manual_seed((self.cfg.train.seed + 1) * 7919 + step * 131 + rank * 17 + micro)  # dropout
        self.data_pos = (batch["epoch"], batch["index"])
        if batch["waves"].shape[0] == 0:  # every file in the batch failed to load: a zero step
            return sum(p.sum() for p in self.parameters()) * 0.0
        frozen = step < self.freeze_steps
        loss, _, _ = self._loss(batch, self._generator(1, step, rank, micro), frozen)
        sr = self.cfg.model.features.sample_rate
        self.last_out = {"loss": float(loss.detach()), "audio_seconds": float(batch["lengths"].sum()) / sr, "frozen": frozen}
        self.log("train/loss", loss, on_step=True, batch_size=batch["waves"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        if batch["waves"].shape[0] == 0:
            return
        loss, lp, frames = self._loss(batch, None)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["waves"].shape[0])
        import jiwer

        for hyp, ref in zip((self.units.decode(x) for x in greedy(lp, frames)), batch["refs"]):
            o = jiwer.process_characters(ref, hyp)
            self.val_errors += o.substitutions + o.deletions + o.insertions
            self.val_chars += o.substitutions + o.deletions + o.hits

    def on_validation_epoch_end(self):
        counts = self.trainer.strategy.reduce(torch.tensor([self.val_errors, self.val_chars], device=self.device),
                                              reduce_op="sum")
        if float(counts[1]) > 0:
            self.log("val/cer", float(counts[0] / counts[1]), sync_dist=False)
        self.val_errors = self.val_chars = 0.0

    def configure_optimizers(self):
        t = self.cfg.train
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=tuple(t.betas),  # not fused: Lightning clips gradients under AMP
        )
        f = tristage(self.cfg) if self.cfg.ctc.schedule == "tristage" else lr_lambda(t)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        # "svqmae_config" makes the checkpoint loadable by svqmae.load (the fine-tuned encoder)
        checkpoint["svqmae_config"] = C.to_dict(C.Config(preset=self.cfg.preset, model=self.cfg.model,
                                                         train=self.cfg.train))
        checkpoint["svqmae_finetune_config"] = C.to_dict(self.cfg)
        checkpoint["data_pos"] = list(self.data_pos)

    def on_load_checkpoint(self, checkpoint):
        self.data_pos = tuple(checkpoint.get("data_pos", (0, -1)))


class FinetuneData(pl.LightningDataModule):
    def __init__(self, cfg: FinetuneConfig, train_cuts, dev_cuts, module: FinetuneModule):
        super().__init__()
        self.cfg, self.train_cuts, self.dev_cuts, self.module = cfg, train_cuts, dev_cuts, module

    def train_dataloader(self):
        epoch, index = self.module.data_pos
        return ctc_loader(self.train_cuts, self.cfg.train, shuffle=True, start=(epoch, index + 1))

    def val_dataloader(self):
        return ctc_loader(self.dev_cuts, self.cfg.train, shuffle=False)


class FinetuneLog(pl.Callback):
    """Terminal progress and ``metrics.jsonl``: step, CTC loss, lr, audio-seconds per second, ETA;
    validation CTC loss and greedy CER on the dev set."""

    def __init__(self, out: Path, cfg: FinetuneConfig, start_step: int, problems: Problems):
        self.out, self.cfg, self.start_step, self.problems = out, cfg, start_step, problems
        self.t0 = self.t_last = time.monotonic()
        self.audio, self.loss, self.n = 0.0, 0.0, 0

    def _write(self, rec: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        out = take_step_output(pl_module, batch, self.problems)
        if out is None:
            return
        self.audio += out["audio_seconds"]
        self.loss += out["loss"]
        self.n += 1
        t, step = self.cfg.train, trainer.global_step
        if (batch_idx + 1) % t.accumulate or step % t.log_every:
            return
        now = time.monotonic()
        audio = float(trainer.strategy.reduce(torch.tensor(self.audio), reduce_op="sum"))
        rec = {"step": step, "epoch": pl_module.data_pos[0], "loss": self.loss / max(self.n, 1),
               "lr": trainer.optimizers[0].param_groups[0]["lr"], "frozen": out["frozen"],
               "audio_seconds_per_s": audio / max(now - self.t_last, 1e-9), "elapsed_s": now - self.t0}
        self.audio, self.loss, self.n, self.t_last = 0.0, 0.0, 0, now
        if not trainer.is_global_zero:
            return
        self._write(rec)
        eta = (t.max_steps - step) * (now - self.t0) / max(step - self.start_step, 1)
        if t.max_minutes > 0:
            eta = min(eta, max(0.0, t.max_minutes * 60 - (now - self.t0)))
        print(f"step {step}/{t.max_steps} | ctc {rec['loss']:.3f} | {rec['audio_seconds_per_s']:.0f} audio-s/s | "
              f"lr {rec['lr']:.2e}{' | encoder frozen' if out['frozen'] else ''} | ETA {_fmt(eta)}",
              file=sys.stderr, flush=True)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k.replace("/", "_"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if m:
            self._write({"step": trainer.global_step, **m})
            log(f"dev at step {trainer.global_step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))


# --------------------------------------------------------------------------- the job


def _check_resume(ckpt: Path, cfg: FinetuneConfig) -> None:
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True).get("svqmae_finetune_config")
    except Exception as e:
        raise CheckpointError(f"{ckpt}: unreadable checkpoint ({str(e).splitlines()[0][:160]})") from None
    if saved is None:
        raise CheckpointError(f"{ckpt}: not a fine-tuning checkpoint (this --out holds another kind of run)")
    old = _finetune_config_from_dict(saved, str(ckpt))
    differ = _arch_diff(old.model, cfg.model)
    differ += [f"{k}: {getattr(old, k)!r} != {getattr(cfg, k)!r}" for k in ("units", "ctc")
               if getattr(old, k) != getattr(cfg, k)]
    if differ:
        raise CheckpointError(f"{ckpt}: checkpoint was made with other settings; differing: " + "; ".join(differ)
                              + " (use a new --out, or the original settings)")


def finetune(model: str, train: list[str], dev: list[str], out: str | Path, preset: str | None = None,
             yaml_files: list[str] | tuple = (), overrides: list[str] | tuple = ()) -> Path:
    """Fine-tune ``model`` (a pre-trained model path, ``random`` or ``fbank``) with CTC on the labelled
    ``train`` sources, validating on ``dev``; rerunning the same call resumes. Returns ``out/model``."""
    from . import api

    quiet_lightning()
    out = Path(out)
    if model in ("random", "fbank"):
        encoder, backbone = None, "svqmae" if model == "random" else "lstm"
        cfg = resolve_finetune(preset, None, yaml_files, overrides)
    else:
        encoder, backbone = api.load(model), "svqmae"
        if preset and preset != encoder.config.preset:
            raise C.ConfigError(f"--preset {preset}: {model} is a pre-trained {encoder.config.preset} model; "
                                "--preset is only for --model random or fbank")
        cfg = resolve_finetune(None, encoder.config, yaml_files, overrides)
    freeze = cfg.ctc.freeze_steps if encoder is not None else 0  # freezing a random encoder is pointless
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        _check_resume(ckpt, cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False, allow_unicode=True))

    # units: built from the training transcripts on the first run, reused on every resume
    problems = Problems()
    unit_file = out / ("units.txt" if cfg.units.kind == "char" else "units.model")
    raw_train = [c for s in train for c in load_source(s, problems)]
    raw_dev = [c for s in dev for c in load_source(s, problems)]
    if unit_file.is_file():
        try:
            units = load_units(out, cfg.units.kind, cfg.units.lowercase)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    else:
        texts = [c.supervisions[0].text or "" for c in raw_train if c.supervisions]
        if not any(normalize(t, cfg.units.lowercase) for t in texts):
            raise DataError(f"{', '.join(train)}: no transcripts (the manifest needs a non-empty `text` column)")
        units = build_units(cfg.units.kind, texts, cfg.units.lowercase, cfg.units.vocab_size, cfg.units.min_count)
        units.save(out)
    log(f"units: {len(units) - 2} {units.kind} units + blank + <unk> (saved to {unit_file})")

    ctc = CTCModel(cfg, len(units), backbone, encoder)
    train_cuts = prepare_cuts(raw_train, train, units, ctc, cfg, "train", cfg.train.max_utt_seconds)
    dev_cuts = prepare_cuts(raw_dev, dev, units, ctc, cfg, "dev")
    for _, reason in problems.items:
        log(f"skipped {reason}")
    hours = sum(c.duration for c in train_cuts) / 3600
    log(f"data: {len(train_cuts)} utterances ({hours:.2f} h) for training, {len(dev_cuts)} for dev")
    n_params = sum(p.numel() for p in ctc.parameters()) / 1e6
    what = {"random": "from scratch", "fbank": "BiLSTM on filterbanks"}.get(model, f"from {model}")
    log(f"model: {cfg.preset} {backbone} {what}, {n_params:.1f}M parameters, "
        f"{1 / (ctc.downsample_rate / cfg.model.features.sample_rate):.0f} CTC frames/s"
        + (f"; encoder frozen for {freeze} steps" if freeze else ""))

    module = FinetuneModule(cfg, ctc, units, freeze)
    start_step = 0
    if ckpt is not None:
        start_step = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", 0))
        log(f"resuming from {ckpt} (step {start_step})")
    progress = FinetuneLog(out, cfg, start_step, problems)
    periodic = PeriodicCheckpoint(out / "checkpoints", cfg.train.ckpt_every_steps, cfg.train.ckpt_every_minutes,
                                  cfg.train.keep_last)
    kw = trainer_kwargs(cfg)
    devices = torch.cuda.device_count() if kw["devices"] == "auto" else kw["devices"]
    multi = devices not in (0, 1, "1", [0]) or cfg.train.num_nodes > 1
    if freeze and multi and cfg.train.strategy in ("auto", "ddp"):
        kw["strategy"] = "ddp_find_unused_parameters_true"  # the frozen encoder gets no gradients at first
    trainer = pl.Trainer(default_root_dir=str(out), logger=TensorBoardLogger(str(out), name="tensorboard", version=""),
                         callbacks=[progress, periodic, NonFiniteGuard(cfg.train.max_nonfinite), StopSignals()], **kw)
    trainer.fit(module, datamodule=FinetuneData(cfg, train_cuts, dev_cuts, module),
                ckpt_path=str(ckpt) if ckpt else None)

    if trainer.is_global_zero:
        card = {"fine-tuned from": model, "training data": ", ".join(map(str, train)),
                "steps": trainer.global_step, "training hours of audio": f"{hours:.2f}"}
        cer = trainer.callback_metrics.get("val/cer")
        if cer is not None:
            card["dev CER (greedy)"] = f"{float(cer):.4f}"
        save_recognizer(ctc, units, cfg, out / "model", card)
        log(f"done at step {trainer.global_step}: recognizer saved to {out / 'model'}")
    return out / "model"


# --------------------------------------------------------------------------- transcription and scoring


@torch.no_grad()
def transcribe_cuts(rec: Recognizer, cuts, decoder: Decoder, max_batch_seconds: float = 60.0,
                    chunk_seconds: float = 30.0) -> list[str]:
    """Text for each cut, in order. Long recordings are cut into ``chunk_seconds`` pieces whose CTC
    outputs are joined before decoding; pieces are batched by length."""
    model = rec.model
    device = next(model.parameters()).device
    sr = rec.cfg.model.features.sample_rate
    step = max(int(chunk_seconds * sr), model.downsample_rate)
    pieces = []  # (cut index, piece index, waveform)
    for i, cut in enumerate(cuts):
        x = load_cut(cut, sr)
        pieces += [(i, j, x[k:k + step]) for j, k in enumerate(range(0, len(x), step))]
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    order = sorted(range(len(pieces)), key=lambda p: len(pieces[p][2]))
    while order:
        take = [order.pop(0)]
        while order and len(pieces[order[0]][2]) * (len(take) + 1) <= max_batch_seconds * sr:
            take.append(order.pop(0))
        xs = [torch.from_numpy(pieces[p][2]) for p in take]
        lengths = torch.tensor([len(x) for x in xs])
        waves = nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lp, frames = model(waves, lengths.to(device))
        for p, row, n in zip(take, lp, frames.tolist()):
            outputs[pieces[p][:2]] = row[:n].float().cpu()
    texts = []
    for i in range(len(cuts)):
        parts = [outputs[k] for k in sorted(k for k in outputs if k[0] == i)]
        lp = torch.cat(parts)[None]
        texts.append(decoder(lp, torch.tensor([lp.shape[1]]))[0])
    return texts


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_transcribe(args) -> None:
    rec = load_recognizer(args.model, _device())
    decoder = Decoder(rec.units, args.beam, args.lm, args.alpha, args.beta)
    problems = Problems()
    cuts = [c for src in args.inputs for c in load_source(src, problems)]
    for _, reason in problems.items:
        print(f"svqmae transcribe: skipped {reason}", file=sys.stderr)
    texts = transcribe_cuts(rec, cuts, decoder, chunk_seconds=args.chunk_seconds)
    rows = [{"path": _cut_path(c), "seconds": round(c.duration, 3), "text": t} for c, t in zip(cuts, texts)]
    for r in rows:
        print(f"{r['path']}\t{r['text']}", flush=True)
    if args.out:
        write_rows(rows, Path(args.out))
        print(f"svqmae transcribe: {len(rows)} transcripts written to {args.out}", file=sys.stderr)


def _cut_path(cut) -> str:
    from .data import cut_path

    p = cut_path(cut)
    return p if not cut.start else f"{p}@{cut.start:.2f}"


def write_rows(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    elif out.suffix.lower() in (".tsv", ".txt"):
        out.write_text("path\tseconds\ttext\n" + "".join(f"{r['path']}\t{r['seconds']}\t{r['text']}\n" for r in rows),
                       encoding="utf-8")
    else:
        raise C.ConfigError(f"{out}: --out must end in .json or .tsv")


def bootstrap_ci(errors: np.ndarray, totals: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of sum(errors)/sum(totals) over utterances resampled with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(errors), size=(n, len(errors)))
    rates = errors[idx].sum(1) / np.maximum(totals[idx].sum(1), 1)
    return [float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))]


def score(rec: Recognizer, data: str, decoder: Decoder, worst: int = 10) -> dict:
    """CER and WER (jiwer) of ``rec`` on the labelled source ``data``, with 95% bootstrap intervals,
    the characters the model never saw in training, and the worst utterances."""
    import jiwer

    problems = Problems()
    cuts = list(load_source(data, problems))
    refs = [normalize((c.supervisions[0].text or "") if c.supervisions else "", rec.units.lowercase) for c in cuts]
    empty = sum(not r for r in refs)
    cuts = [c for c, r in zip(cuts, refs) if r]
    refs = [r for r in refs if r]
    if not cuts:
        raise DataError(f"{data}: no utterance with a non-empty `text` transcript to score")
    hyps = transcribe_cuts(rec, cuts, decoder)
    unseen: Counter = Counter()
    with_unseen = 0
    rows, ce, cn, we, wn = [], [], [], [], []
    for c, r, h in zip(cuts, refs, hyps):
        miss = rec.units.unseen(r)
        unseen.update(miss)
        with_unseen += bool(miss)
        o = jiwer.process_characters(r, h)
        ce.append(o.substitutions + o.deletions + o.insertions)
        cn.append(o.substitutions + o.deletions + o.hits)
        w = jiwer.process_words(" ".join(words(r)), " ".join(words(h)) or "")
        we.append(w.substitutions + w.deletions + w.insertions)
        wn.append(w.substitutions + w.deletions + w.hits)
        rows.append({"path": _cut_path(c), "ref": r, "hyp": h, "char_errors": ce[-1], "chars": cn[-1],
                     "cer": ce[-1] / max(cn[-1], 1), "unseen": "".join(sorted(set(miss)))})
    ce, cn, we, wn = map(np.asarray, (ce, cn, we, wn))
    report = {
        "model": str(rec.path), "data": str(data), "decoding": {"beam": decoder.beam, "lm": decoder.lm},
        "utterances": len(rows), "skipped_empty_transcripts": empty, "skipped_unreadable": len(problems),
        "cer": float(ce.sum() / max(cn.sum(), 1)), "cer_ci95": bootstrap_ci(ce, cn),
        "wer": float(we.sum() / max(wn.sum(), 1)), "wer_ci95": bootstrap_ci(we, wn),
        "characters": int(cn.sum()), "words": int(wn.sum()),
        "unseen_characters": dict(unseen.most_common()), "utterances_with_unseen_characters": with_unseen,
        "unseen_note": "characters absent from the fine-tuning transcripts cannot be recognised; they stay in "
                       "the references and count as errors",
        "worst": sorted(rows, key=lambda r: (-r["char_errors"], r["path"]))[:worst],
    }
    return report


def cmd_score(args) -> None:
    rec = load_recognizer(args.model, _device())
    decoder = Decoder(rec.units, args.beam, args.lm, args.alpha, args.beta)
    report = score(rec, args.data, decoder, args.worst)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    lo, hi = report["cer_ci95"]
    print(f"CER {100 * report['cer']:.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}) | "
          f"WER {100 * report['wer']:.2f}% | {report['utterances']} utterances -> {out}")
    if report["skipped_empty_transcripts"]:
        print(f"svqmae score: skipped {report['skipped_empty_transcripts']} utterance(s) with an empty transcript",
              file=sys.stderr)
    if report["unseen_characters"]:
        chars = "".join(report["unseen_characters"])
        print(f"svqmae score: {report['utterances_with_unseen_characters']} reference(s) hold characters unseen in "
              f"fine-tuning ({chars[:40]}); they count as errors (listed in {out})", file=sys.stderr)


# --------------------------------------------------------------------------- command line


def cmd_finetune(args) -> None:
    from .cli import engine_overrides

    overrides = list(args.set) + engine_overrides(args)
    for flag, key in (("units", "units.kind"), ("vocab_size", "units.vocab_size")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    finetune(args.model, args.train, args.dev, args.out, args.preset, args.config, overrides)


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=int, default=1, help="beam width (1: greedy; >1: pyctcdecode beam search)")
    p.add_argument("--lm", metavar="ARPA", help="KenLM n-gram (ARPA or binary) for shallow fusion; needs `pip install kenlm`")
    p.add_argument("--alpha", type=float, default=0.5, help="LM weight (with --lm)")
    p.add_argument("--beta", type=float, default=1.0, help="word insertion bonus (with --lm)")


def add_cli(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune an encoder into a CTC speech recognizer (resumes if --out has checkpoints)")
    p.add_argument("--model", required=True, metavar="M",
                   help="pre-trained model (model/ folder or run DIR), `random` (same architecture from scratch, "
                        "with --preset) or `fbank` (BiLSTM on filterbanks, with --preset)")
    p.add_argument("--train", action="append", required=True, metavar="SRC",
                   help="labelled source: TSV/CSV manifest with path and text columns, or lhotse manifest (repeatable)")
    p.add_argument("--dev", action="append", required=True, metavar="SRC", help="labelled dev source (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--units", choices=["char", "bpe"], help="output units (default char)")
    p.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size (--units bpe)")
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="architecture for --model random/fbank (default base)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="YAML overrides (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set ctc.freeze_steps=0 --set train.lr=1e-4 (repeatable)")
    from .cli import add_engine_args

    add_engine_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("transcribe", help="transcribe audio files with a fine-tuned model (text per file on stdout)")
    p.add_argument("--model", required=True, metavar="DIR", help="fine-tuned model (DIR or DIR/model)")
    p.add_argument("inputs", nargs="+", metavar="FILE|FOLDER", help="audio files, folders (recursive) or manifests")
    p.add_argument("--out", metavar="OUT.json|OUT.tsv", help="also write the transcripts to a JSON or TSV file")
    p.add_argument("--chunk-seconds", type=float, default=30.0, help="longer recordings are decoded in pieces")
    _add_decode_args(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("score", help="CER/WER of a fine-tuned model on a labelled source, with 95%% bootstrap intervals")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="SRC", help="labelled source (manifest with a text column)")
    p.add_argument("--out", required=True, metavar="REPORT.json")
    p.add_argument("--worst", type=int, default=10, help="how many of the worst utterances to list")
    _add_decode_args(p)
    p.set_defaults(func=cmd_score)


__all__ = ["FinetuneConfig", "CTCModel", "Recognizer", "finetune", "load_recognizer", "save_recognizer",
           "transcribe_cuts", "score", "resolve_finetune", "spec_augment", "add_cli"]
