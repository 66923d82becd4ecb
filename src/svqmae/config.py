"""Configuration: dataclasses are the single source of defaults.

Resolution order (later wins): dataclass defaults -> preset -> YAML file(s) -> ``--set key=value``.
Keys are dotted paths into the tree, e.g. ``model.encoder.layers=6`` or ``train.lr=3e-4``.
The resolved config is written as YAML next to every run and inside every checkpoint.

Two trees: ``Config`` (pre-training: model + train) and ``FinetuneConfig`` (CTC fine-tuning: model +
train + units + specaug + ctc), each with its presets. This module imports nothing of svqmae.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file at fault."""


# a numeric field's range: "any" (finite), "> 0", ">= 1", "< 1", "<= 1", or an interval "[0, 1]", "(0, 1)", "[0, 1)"
_RANGE = re.compile(r"^(any)$|^([<>]=?) ?(-?[\d.]+)$|^([\[(])(-?[\d.]+), (-?[\d.]+)([\])])$")


def ranged(default: Any, spec: str) -> Any:
    """A numeric field: its ``default`` and its range ``spec`` (see ``_RANGE``), checked with every
    value finite whenever a configuration resolves or loads (:func:`check_ranges`); each element of a
    tuple is checked. A field that also takes "auto" (``AUTO``) is checked when it holds a number."""
    if not _RANGE.match(spec):
        raise ValueError(f"range {spec!r}: expected any, > x, >= x, < x, <= x or an interval such as [0, 1)")
    return field(default=default, metadata={"range": spec})


def in_range(x: float, spec: str) -> bool:
    """Whether the finite number ``x`` lies in ``spec``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return False
    m = _RANGE.match(spec)
    if m.group(1):
        return True
    if m.group(2):
        op, b = m.group(2), float(m.group(3))
        return {">": x > b, ">=": x >= b, "<": x < b, "<=": x <= b}[op]
    lo, hi = float(m.group(5)), float(m.group(6))
    return (lo < x if m.group(4) == "(" else lo <= x) and (x < hi if m.group(7) == ")" else x <= hi)


def check_ranges(node: Any, source: str, prefix: str = "") -> None:
    """Every numeric field of the dataclass tree ``node`` within the range it declares (:func:`ranged`)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, source, f"{key}.")
            continue
        spec = f.metadata.get("range")
        if spec is None or (isinstance(value, str) and f.name in getattr(node, "AUTO", {})):
            continue
        if not all(in_range(x, spec) for x in (value if isinstance(value, tuple) else (value,))):
            where = "a finite number" if spec == "any" else f"a finite number {spec}" if spec[0] in "<>" else \
                f"a finite number in {spec}"
            raise ConfigError(f"{source}: {key} must be {where}, got {value!r}")


@dataclass
class FeatureConfig:
    sample_rate: int = ranged(16000, "> 0")  # every input is resampled to this rate
    n_mels: int = ranged(80, ">= 1")  # F: log-mel filterbank bins
    frame_length_ms: float = ranged(25.0, "> 0")  # filterbank analysis window
    frame_shift_ms: float = ranged(10.0, "> 0")  # filterbank hop: 10 ms = 100 frames per second, before stacking
    stack: int = ranged(4, ">= 1")  # frames per token: 4 -> 40 ms tokens (25 Hz), 2 -> 50 Hz
    # "utterance": each utterance's mel bins to zero mean, unit variance (removes loudness and level);
    # "global": fixed per-bin statistics of the pre-training corpus, estimated before the first step and
    # saved with the model (keeps each utterance's loudness and level, which carry emotion)
    norm: str = "utterance"
    # True: each utterance's level (per-bin mean and log standard deviation of its log-mel frames, 2F
    # values, what "utterance" normalization removes) is projected and added to every token's embedding,
    # so the encoder keeps loudness and spectral level (emotion, speaker) while the tokens and the
    # quantizer's targets stay normalized (emotion +9.7 points, keywords +2.8 on speech_commands, but
    # keywords -19 on the built-in demo's synthetic voices: BENCHMARKS.md; so off by default).
    # Models saved before this option load with False (config.ADDED_KEYS)
    level: bool = False
    # True: the model's features (``extract()``) begin with one more state, before the input embedding:
    # the utterance's level (the same 2F statistics) through a fixed random orthonormal map to the
    # encoder's width D (saved with the weights, never trained), the same at every token. The encoder
    # never sees it: per-utterance normalization stays lossless for whoever reads the features
    # (emotion of unseen actors +10 points, keywords +4, the demo's unseen voices +12 on keywords:
    # BENCHMARKS.md). Models saved before this option load with False and extract what they did
    # (config.ADDED_KEYS)
    level_state: bool = True


@dataclass
class MaskConfig:
    ratio: float = ranged(0.7, "(0, 1)")  # share of (non-padding) tokens that are masked, exact per utterance
    span: int = ranged(3, ">= 1")  # tokens per masked span
    count: int = ranged(1, ">= 1")  # masks drawn per utterance and step; the front end and quantizer run once for all of them


@dataclass
class MixConfig:
    # WavLM's utterance mixing (pre-training only): this share of the utterances in a batch get a
    # segment of another one added (at most max_share of their length, primary-to-added energy ratio
    # uniform in +-ratio_db dB); the encoder hears the mixture, the targets are the clean utterance's
    prob: float = ranged(0.0, "[0, 1]")
    max_share: float = ranged(0.5, "(0, 1]")  # the added piece is at most this share of the utterance's length
    ratio_db: float = ranged(5.0, ">= 0")  # utterance-to-added energy ratio, uniform in +-ratio_db dB


@dataclass
class QuantizerConfig:
    kind: str = "random"  # "random": frozen random projection (BEST-RQ); "learned": EMA k-means VQ
    codebook_size: int = ranged(1024, ">= 2")  # K
    code_dim: int = ranged(16, ">= 1")  # each token is projected to this many dimensions before its nearest code is taken
    num_codebooks: int = ranged(1, ">= 1")  # independent projections and codebooks; the decoder predicts a code from each (one cross-entropy each)
    seed: int = ranged(1234, "any")  # the random projection and codebook are a pure function of this seed
    ema_decay: float = ranged(0.99, "[0, 1)")  # learned VQ only


@dataclass
class TransformerConfig:
    layers: int = ranged(12, ">= 1")  # Transformer blocks
    dim: int = ranged(768, ">= 1")  # D
    heads: int = ranged(12, ">= 1")  # attention heads; dim / heads must be even (rotary embeddings)
    ffn_dim: int = ranged(3072, ">= 1")  # hidden width of each block's feed-forward layer
    dropout: float = ranged(0.1, "[0, 1)")  # dropout inside the blocks (attention and feed-forward); the only architecture key fine-tuning may change
    rope_base: float = ranged(10000.0, "> 0")  # base of the rotary position embeddings' frequencies


@dataclass
class ModelConfig:
    variant: str = "svqmae"  # "svqmae" (visible-only encoder + decoupled decoder) | "encoder_only" (ablation)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(layers=4, dim=384, heads=6, ffn_dim=1536)
    )
    # kernel (tokens, odd) of a depthwise convolution over the decoder's input grid, before its first block:
    # it spreads each visible token's content onto the masked slots around it (15 x 40 ms = 0.6 s); 0 = none
    decoder_conv: int = ranged(15, ">= 0")
    recon_weight: float = ranged(0.0, ">= 0")  # weight of the optional filterbank-reconstruction loss on masked tokens


@dataclass
class TrainConfig:
    seed: int = ranged(0, "any")  # seed of the weights, data order, crops and masks (a resumed run draws what the uninterrupted one would)
    lr: float = ranged(5e-4, "> 0")  # peak learning rate (AdamW), reached after warmup_steps; in fine-tuning, the CTC head's
    min_lr_ratio: float = ranged(0.05, "[0, 1]")  # cosine decay floor, as a share of lr
    weight_decay: float = ranged(0.01, ">= 0")  # AdamW weight decay, on weight matrices only (not biases, norms or the mask embedding)
    betas: tuple[float, float] = ranged((0.9, 0.98), "[0, 1)")  # AdamW's betas
    warmup_steps: int = ranged(1000, ">= 0")  # optimizer steps of linear learning-rate warm-up
    max_steps: int = ranged(400_000, ">= 1")  # optimizer steps to train (--max-steps); the schedule decays over them
    max_minutes: float = ranged(0.0, ">= 0")  # 0 = no time budget
    grad_clip: float = ranged(1.0, ">= 0")  # clip the global gradient norm to this; 0 = no clipping
    accumulate: int = ranged(1, ">= 1")  # gradient accumulation: 4 GPUs x 16 stand in for 64 GPUs
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32 on CPU | "bf16" | "32"
    # audio seconds per batch (per device), or "auto": pre-training measures, once, the largest batch that fits
    # the device's memory (x auto_batch_margin) and caches it in DIR/auto_batch.json; on a CPU "auto" is the
    # preset's own figure (tiny 120, small 240, base 320), without a search
    max_batch_seconds: float | str = ranged(320.0, "> 0")
    auto_batch_margin: float = ranged(0.85, "(0, 1]")  # share of the device's memory an automatic batch may plan for
    max_utt_seconds: float = ranged(15.0, "> 0")  # longer utterances are randomly cropped
    min_utt_seconds: float = ranged(0.5, ">= 0")  # shorter utterances are skipped
    speed_perturb: float = ranged(0.0, "[0, 1)")  # 0.1: each training utterance at a random speed in [0.9, 1.1] (tempo and pitch)
    num_buckets: int = ranged(10, ">= 1")  # duration buckets of the batch sampler (utterances of similar length are batched together)
    num_workers: int | str = ranged("auto", ">= 0")  # loader processes; auto: min(2, cores / 2) on a CPU, cores per GPU - 1 (<= 16) on GPUs
    stream_buffer: int = ranged(2000, ">= 1")  # streamed data (Shar, large manifests): cuts each loader buffers to shuffle and bucket
    val_items: int = ranged(64, ">= 0")  # held-out utterances for validation (fixed masks)
    val_every: int = ranged(500, ">= 1")  # validate on the held-out items every this many optimizer steps
    log_every: int = ranged(10, ">= 1")  # a progress line and a metrics.jsonl row every this many optimizer steps
    ckpt_every_steps: int = ranged(500, ">= 0")  # write a checkpoint every this many optimizer steps ...
    ckpt_every_minutes: float = ranged(10.0, ">= 0")  # ... or every this many minutes, whichever comes first
    keep_last: int = ranged(2, ">= 1")  # periodic checkpoints kept (best.ckpt, the lowest validation loss, is kept besides)
    max_nonfinite: int = ranged(5, ">= 1")  # non-finite loss/gradients: each such step is skipped; this many in a row stop the run
    ddp_timeout_minutes: float = ranged(30.0, "> 0")  # a collective waiting longer (hung or dead rank) ends the whole job
    inject_faults: list[str] = field(default_factory=list)  # testing: KIND@STEP[:rankR] (svqmae.engine.faults)
    devices: str = "auto"  # GPUs per node (--devices): auto (every GPU, else the CPU) or a number
    num_nodes: int = ranged(1, ">= 1")  # nodes of the job (--num-nodes)
    strategy: str = "auto"  # Lightning strategy: auto (DDP, with ddp_timeout_minutes, on several devices), ddp, or another Lightning strategy name
    # learning-rate progress is max(step / max_steps, elapsed / max_minutes): with a time budget the schedule
    # warms up and decays over the minutes too (whichever budget binds first); False: steps only
    time_schedule: bool = True
    # speed (svqmae.engine.speed): "auto" turns each on where it is faster (torch_compile and pack: CUDA only;
    # fused_adamw: CUDA and CPUs); "on" / "off" force it. None changes what is computed, only how
    # (tests/engine/test_speed.py checks each against the plain path); the log's "speed:" line says which are on
    torch_compile: str = "auto"  # torch.compile the Transformer blocks (shapes bucketed, dynamic: no per-step recompiles)
    pack: str = "auto"  # encoder: the visible tokens of the whole batch in one sequence, per-utterance attention
    fused_adamw: str = "auto"  # fused AdamW; non-finite steps are then skipped on the device, without a host sync
    shape_bucket: int | str = ranged("auto", ">= 1")  # pad token counts to a multiple of this so that shapes repeat; auto: 16 CUDA, 1 CPU

    AUTO: ClassVar[dict[str, type]] = {"max_batch_seconds": float, "num_workers": int, "shape_bucket": int}
    SWITCHES: ClassVar[tuple[str, ...]] = ("torch_compile", "pack", "fused_adamw")  # auto | on | off


@dataclass
class Config:
    preset: str = "base"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # a few M parameters; learns something in minutes on 2 CPU cores
    "tiny": {
        "model.encoder": dict(layers=4, dim=256, heads=4, ffn_dim=1024, dropout=0.0),
        # SVQ-MAE's best 12-CPU-minute setting, chosen by the probes' dev accuracy over all tried (BENCHMARKS.md,
        # "Filterbank reconstruction", 2026-12-06): 4 target codebooks, a decoder 3/4 of the encoder's width
        # (1.3x cheaper steps than the ablation's) and the decoder also reconstructing the masked tokens'
        # filterbanks; before: 1 codebook, a 2 x 128 decoder, codes only (saved models keep their own config)
        "model.decoder": dict(layers=2, dim=192, heads=3, ffn_dim=768, dropout=0.0),
        "model.quantizer.codebook_size": 512,
        "model.quantizer.num_codebooks": 4,
        "model.recon_weight": 1.0,
        "train": dict(lr=1.5e-3, warmup_steps=100, max_steps=2000, max_batch_seconds=120.0,
                      max_utt_seconds=8.0, val_items=32, val_every=100, ckpt_every_steps=100,
                      ckpt_every_minutes=2.0, log_every=5),
    },
    "small": {
        "model.encoder": dict(layers=8, dim=512, heads=8, ffn_dim=2048, dropout=0.05),
        "model.decoder": dict(layers=2, dim=256, heads=4, ffn_dim=1024, dropout=0.0),
        "train": dict(lr=1e-3, warmup_steps=500, max_steps=100_000, max_batch_seconds=240.0),
    },
    # wav2vec 2.0 BASE's encoder size
    "base": {},
}


def preset_batch_seconds(preset: str) -> float:
    """The preset's batch in audio seconds: what ``train.max_batch_seconds=auto`` means on a CPU."""
    return float(PRESETS.get(preset, {}).get("train", {}).get("max_batch_seconds", TrainConfig.max_batch_seconds))


def _set_path(cfg: Any, dotted: str, value: Any, source: str, prefix: str = "") -> None:
    """Set ``dotted`` (below the section ``prefix``, which messages name) to ``value``."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{source}: unknown config key '{prefix}{where}'")
        if i == len(parts) - 1:
            current = getattr(node, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: '{prefix}{dotted}' is a section; give a mapping")
                for k, v in value.items():
                    _set_path(current, str(k), v, source, f"{prefix}{dotted}.")
            else:
                numeric = getattr(node, "AUTO", {}).get(part)  # a number or "auto"
                if numeric is not None and value == "auto":
                    setattr(node, part, "auto")
                else:
                    setattr(node, part, _coerce(numeric() if numeric else current, value, prefix + dotted, source))
        else:
            node = getattr(node, part)


def _coerce(current: Any, value: Any, key: str, source: str) -> Any:
    """Coerce ``value`` to the type of the default ``current``."""
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            if isinstance(value, str):
                value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple(type(c)(v) for c, v in zip(current, value, strict=True))
        if isinstance(current, str):
            if isinstance(value, bool):  # YAML reads on/off/true/false as booleans
                return "on" if value else "off"
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{source}: '{key}' expects {type(current).__name__}, got {value!r}"
        ) from None
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return list(x)
        return x

    return fix(d)


# Saved configs (checkpoints, model folders, fine-tuning metadata) may come from earlier versions.
# RETIRED_KEYS: written by those versions, meaningless now; dropped on load (in a user's YAML they are errors).
# ADDED_KEYS: added since, with the value that reproduces what a model saved before them did.
RETIRED_KEYS = {"train.compile"}
ADDED_KEYS = {"model.decoder_conv": 0, "model.features.norm": "utterance", "model.features.level": False,
              "model.features.level_state": False, "model.mask.count": 1,
              "ctc.encoder_lr_ratio": 1.0, "ctc.layer_decay": 1.0, "ctc.layer_sum": False, "ctc.reinit_top": 0,
              "train.time_schedule": False, "train.torch_compile": "off", "train.pack": "off",
              "train.fused_adamw": "off", "train.shape_bucket": 1}


def apply_saved(cfg: Any, d: dict[str, Any], source: str) -> None:
    """Set the values of a saved nested dict ``d`` on ``cfg`` (a Config or a dataclass holding the same
    sections): unknown keys are errors, except ``RETIRED_KEYS``; a section lacking a key of
    ``ADDED_KEYS`` predates it and gets the old behaviour."""

    def upgrade(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {k: upgrade(v, f"{prefix}{k}.") if isinstance(v, dict) else v
               for k, v in node.items() if f"{prefix}{k}" not in RETIRED_KEYS}
        for path, old in ADDED_KEYS.items():
            parent, _, key = path.rpartition(".")
            if parent + "." == prefix and key not in out:
                out[key] = old
        return out

    for k, v in upgrade(d, "").items():
        _set_path(cfg, k, v, source)


def from_dict(d: dict[str, Any], source: str = "config") -> Config:
    """Build a Config from a saved nested dict (see :func:`apply_saved`)."""
    cfg = Config()
    apply_saved(cfg, d, source)
    validate(cfg, source)
    return cfg


def apply_preset(cfg: Config, name: str) -> None:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    cfg.preset = name
    for k, v in PRESETS[name].items():
        _set_path(cfg, k, v, f"preset {name}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a config file is YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(e, "problem", None) or e.__class__.__name__
        raise ConfigError(f"{p}: not valid YAML ({where}{what})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def apply_overrides(cfg: Any, docs: list[tuple[str, dict]], overrides: list[str] | tuple) -> None:
    """YAML documents ``(source, dict)`` in order (their ``preset`` key aside), then ``key=value`` items."""
    for src, d in docs:
        for k, v in d.items():
            if k != "preset":
                _set_path(cfg, k, v, src)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        _set_path(cfg, k.strip(), yaml.safe_load(v), f"--set {k.strip()}")


def resolve(
    preset: str | None = None,
    yaml_files: list[str | Path] | tuple = (),
    overrides: list[str] | tuple = (),
) -> Config:
    """defaults -> preset -> YAML files -> ``key=value`` overrides, then validate."""
    cfg = Config()
    docs = [(str(f), load_yaml(f)) for f in yaml_files]
    # a YAML file may name its preset; the command line's --preset wins
    name = preset or next((d["preset"] for _, d in reversed(docs) if "preset" in d), None) or "base"
    apply_preset(cfg, name)
    apply_overrides(cfg, docs, overrides)
    validate(cfg, "config")
    return cfg


def validate(cfg: Config, source: str) -> None:
    """The ranges every field declares (:func:`check_ranges`), then what ties fields together."""
    check_ranges(cfg, source)
    m, t = cfg.model, cfg.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {msg}")

    need(m.variant in ("svqmae", "encoder_only"), f"model.variant must be svqmae or encoder_only, got {m.variant!r}")
    need(m.quantizer.kind in ("random", "learned"), f"model.quantizer.kind must be random or learned, got {m.quantizer.kind!r}")
    need(0.0 < m.mask.ratio < 1.0, f"model.mask.ratio must be in (0, 1), got {m.mask.ratio}")
    need(m.mask.span >= 1, "model.mask.span must be >= 1")
    need(m.mask.count >= 1, "model.mask.count must be >= 1")
    need(0.0 <= m.mix.prob <= 1.0, f"model.mix.prob must be in [0, 1], got {m.mix.prob}")
    need(0.0 < m.mix.max_share <= 1.0, f"model.mix.max_share must be in (0, 1], got {m.mix.max_share}")
    need(m.mix.ratio_db >= 0.0, f"model.mix.ratio_db must be >= 0, got {m.mix.ratio_db}")
    need(m.features.norm in ("utterance", "global"), f"model.features.norm must be utterance or global, got {m.features.norm!r}")
    need(m.features.stack >= 1, "model.features.stack must be >= 1")
    need(m.decoder_conv == 0 or (m.decoder_conv > 0 and m.decoder_conv % 2 == 1),
         f"model.decoder_conv must be 0 (none) or an odd kernel size, got {m.decoder_conv}")
    need(m.quantizer.codebook_size >= 2, "model.quantizer.codebook_size must be >= 2")
    for name, tc in (("encoder", m.encoder), ("decoder", m.decoder)):
        need(tc.layers >= 1, f"model.{name}.layers must be >= 1")
        need(tc.dim % tc.heads == 0, f"model.{name}.dim ({tc.dim}) must be divisible by heads ({tc.heads})")
        need((tc.dim // tc.heads) % 2 == 0, f"model.{name}: head size must be even (rotary embeddings)")
    need(t.precision in ("auto", "bf16", "32"), f"train.precision must be auto, bf16 or 32, got {t.precision!r}")
    need(re.fullmatch(r"auto|-1|[1-9]\d*|\d+,(\d+,?)*", str(t.devices)) is not None,
         f"train.devices must be auto, a device count >= 1, -1 (all) or device indices such as 0,1; got {t.devices!r}")
    need(t.accumulate >= 1, "train.accumulate must be >= 1")
    need(0.0 <= t.speed_perturb < 1.0, f"train.speed_perturb must be in [0, 1), got {t.speed_perturb}")
    need(t.max_batch_seconds == "auto" or t.max_batch_seconds >= t.max_utt_seconds,
         "train.max_batch_seconds must be auto or >= train.max_utt_seconds")
    need(0 < t.auto_batch_margin <= 1, "train.auto_batch_margin must be in (0, 1]")
    need(t.num_workers == "auto" or t.num_workers >= 0, "train.num_workers must be auto or >= 0")
    need(t.shape_bucket == "auto" or t.shape_bucket >= 1, "train.shape_bucket must be auto or >= 1")
    for name in TrainConfig.SWITCHES:
        need(getattr(t, name) in ("auto", "on", "off"), f"train.{name} must be auto, on or off, got {getattr(t, name)!r}")


def private_tmp(path: Path, suffix: str = "") -> Path:
    """A temporary name beside ``path`` that no other process or thread uses (``suffix`` keeps the
    format), to write and then rename: DDP ranks may write the same file at once."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write atomically, through a temporary file of this process's own (DDP ranks write it at once)."""
    path = Path(path)
    tmp = private_tmp(path)
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def diff(a: Config, b: Config, prefix: str = "model") -> list[str]:
    """Dotted keys under ``prefix`` whose values differ between two configs."""
    da, db = to_dict(a)[prefix], to_dict(b)[prefix]
    out: list[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}")
        elif x != y:
            out.append(f"{path}: {x!r} != {y!r}")

    walk(da, db, prefix)
    return out


# --------------------------------------------------------------------------- CTC fine-tuning


@dataclass
class UnitsConfig:
    kind: str = "char"  # "char": characters of the training transcripts | "bpe": a sentencepiece model
    vocab_size: int = ranged(300, ">= 4")  # bpe only (an upper bound on tiny data)
    min_count: int = ranged(1, ">= 1")  # char only: characters seen fewer times in training map to <unk>
    lowercase: bool = True  # lower-case the transcripts before they become units


@dataclass
class SpecAugConfig:
    time_mask_prob: float = ranged(0.04, "[0, 1)")  # masks per token (each starts a span of up to time_mask_width tokens)
    time_mask_width: int = ranged(5, ">= 1")  # tokens (5 x 40 ms = 0.2 s at 25 Hz)
    freq_masks: int = ranged(2, ">= 0")  # masks per utterance over the mel bins (same bins in every stacked frame)
    freq_mask_width: int = ranged(15, ">= 0")  # mel bins, at most


@dataclass
class CTCConfig:
    freeze_steps: int = ranged(1000, ">= 0")  # the encoder is frozen (head only) for the first N steps; pre-trained models only
    # the encoder's learning rate as a share of the head's (train.lr): 1.0 = one learning rate for all;
    # 0 = the encoder stays frozen throughout (only the head trains)
    encoder_lr_ratio: float = ranged(1.0, ">= 0")
    # layer-wise learning-rate decay (BEiT / data2vec fine-tuning): block i (0-based) of n gets
    # layer_decay ** (n - i) times the encoder's learning rate, the front-end embedding layer_decay ** (n + 1),
    # the encoder's final norm the encoder's rate itself; 1.0 = off
    layer_decay: float = ranged(1.0, "(0, 1]")
    schedule: str = "tristage"  # "tristage" (warm-up, hold, exponential decay) | "cosine" (train.warmup_steps)
    stages: tuple[float, float, float] = ranged((0.1, 0.4, 0.5), "[0, 1]")  # tri-stage shares of max_steps
    final_lr_ratio: float = ranged(0.05, "(0, 1]")  # tri-stage: lr at the end, as a share of train.lr
    head_dropout: float = ranged(0.1, "[0, 1)")  # dropout on the encoder output before the CTC head
    # the CTC head's input: False = the encoder's last layer; True = a learned softmax-weighted sum of every
    # hidden state (the embedding and each block, each layer-normalised), as SUPERB's probes use
    layer_sum: bool = False
    # a pre-trained encoder's top N blocks (and its final norm) start from random weights: what the
    # pre-training objective specialised them for is not what CTC needs; 0 = keep them
    reinit_top: int = ranged(0, ">= 0")
    upsample: int = ranged(1, ">= 1")  # CTC frames per token: 2 doubles the label rate (long transcripts at 25 Hz)
    lstm_layers: int = ranged(3, ">= 1")  # the fbank baseline's BiLSTM
    lstm_dim: int = ranged(0, ">= 0")  # its width (both directions); 0: the preset's encoder width


@dataclass
class FinetuneConfig:
    preset: str = "base"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    specaug: SpecAugConfig = field(default_factory=SpecAugConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)


# fine-tuning defaults per preset (the architecture comes from the pre-trained model, or from the
# pre-training preset of the same name for --model random/fbank)
FT_PRESETS: dict[str, dict] = {
    "tiny": {
        # small batches: more updates per CPU minute. The learning rates, the top block's restart and no
        # freezing come from benchmarks/finetune_cer.py (BENCHMARKS.md, 2026-12-02): the pre-trained
        # encoder beat training from scratch at 4, 8 and 16 CPU-minutes with them, and lost with the
        # earlier defaults (lr 5e-4, one rate, the top block kept)
        "train": dict(lr=3e-3, warmup_steps=50, max_steps=2000, max_batch_seconds=60.0, max_utt_seconds=20.0,
                      val_every=200, log_every=10, ckpt_every_steps=200,
                      ckpt_every_minutes=2.0, num_workers=1, weight_decay=0.0),
        "ctc": dict(freeze_steps=0, encoder_lr_ratio=0.3, reinit_top=1),
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


def resolve_finetune(preset: str | None = None, model_cfg: Config | None = None,
                     yaml_files: list[str] | tuple = (), overrides: list[str] | tuple = ()) -> FinetuneConfig:
    """defaults -> fine-tuning preset (+ the architecture: ``model_cfg``'s, else the pre-training
    preset's) -> YAML files -> ``key=value`` overrides. With a pre-trained ``model_cfg`` only the
    dropout of the architecture may be overridden."""
    cfg = FinetuneConfig()
    docs = [(str(f), load_yaml(f)) for f in yaml_files]
    name = (model_cfg.preset if model_cfg is not None else None) or preset or next(
        (d["preset"] for _, d in reversed(docs) if "preset" in d), None) or "base"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    cfg.preset = name
    if model_cfg is not None:
        cfg.model = copy.deepcopy(model_cfg.model)
    else:
        arch = Config()
        apply_preset(arch, name)
        cfg.model = arch.model
    for k, v in FT_PRESETS.get(name, {}).items():
        _set_path(cfg, k, v, f"fine-tuning preset {name}")
    apply_overrides(cfg, docs, overrides)
    if model_cfg is not None:
        changed = [d for d in arch_diff(model_cfg.model, cfg.model)]
        if changed:
            raise ConfigError("the architecture comes from the pre-trained model and cannot be changed "
                                "(only dropout can); differing: " + "; ".join(changed))
    validate_finetune(cfg, "config")
    return cfg


def arch_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [d for d in diff(Config(model=a), Config(model=b), "model") if ".dropout:" not in d]


def validate_finetune(cfg: FinetuneConfig, source: str) -> None:
    validate(cfg, source)  # the model and train sections, as in pre-training

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {msg}")

    u, s, c = cfg.units, cfg.specaug, cfg.ctc
    need(u.kind in ("char", "bpe"), f"units.kind must be char or bpe, got {u.kind!r}")
    need(u.vocab_size >= 4, "units.vocab_size must be >= 4")
    need(c.schedule in ("tristage", "cosine"), f"ctc.schedule must be tristage or cosine, got {c.schedule!r}")
    need(all(x >= 0 for x in c.stages) and abs(sum(c.stages) - 1) < 1e-6, "ctc.stages must be 3 shares summing to 1")
    need(0 < c.final_lr_ratio <= 1, "ctc.final_lr_ratio must be in (0, 1]")
    need(c.upsample >= 1, "ctc.upsample must be >= 1")
    need(c.encoder_lr_ratio >= 0, f"ctc.encoder_lr_ratio must be >= 0, got {c.encoder_lr_ratio}")
    need(0 < c.layer_decay <= 1, f"ctc.layer_decay must be in (0, 1], got {c.layer_decay}")
    need(0 <= s.time_mask_prob < 1 and s.time_mask_width >= 1, "specaug: time_mask_prob in [0, 1), width >= 1")
    need(0 <= s.freq_mask_width < cfg.model.features.n_mels, "specaug.freq_mask_width must be < model.features.n_mels")
    need(cfg.train.max_batch_seconds != "auto", "train.max_batch_seconds=auto is for pre-training; give fine-tuning "
                                                 "a number of seconds")
