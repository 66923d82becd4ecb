"""Speed: how a training step runs, never what it computes.

``train.torch_compile``, ``train.pack`` (each auto | on | off; auto = on for CUDA, off on a CPU),
``train.fused_adamw`` (auto = on for CUDA and CPUs alike: on a CPU the fused kernel is also about 4x
faster than the foreach one, a quarter of a BASE step) and ``train.shape_bucket`` (auto = 16 tokens on
CUDA, 1 on a CPU) resolve here, per device, into a :class:`Speed`; :func:`apply_speed` sets them on a model and :func:`adamw` builds the
optimizer. What each one does:

- compile: every Transformer block is ``torch.compile``d in place, with dynamic shapes (the token
  counts are also bucketed), so a new batch shape reuses the compiled code instead of recompiling;
  attention stays one eager kernel call between the compiled halves of a block.
- pack: the encoder runs on the visible tokens of the whole batch laid end to end, each attending only
  to its own utterance (variable-length flash attention on CUDA, a block-diagonal mask elsewhere):
  no compute spent on padding.
- fused AdamW: one kernel per step for the whole update; on CUDA a non-finite step is skipped by the
  kernel itself (``found_inf``), so the step never waits for the host
  (:class:`~svqmae.engine.faults.NonFiniteGuard`).
- the masks, the visible and masked token indices and the code statistics are computed on the device
  with sizes known on the host (svqmae.model.masking): no host synchronisation inside a step, on every
  device.

CUDA graphs are not used: batches change shape from step to step (dynamic duration buckets), which
would need one graph per shape; compiling with dynamic shapes and larger batches
(``train.max_batch_seconds=auto``) is what removes the launch overhead of small models here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig


@dataclass(frozen=True)
class Speed:
    compile: bool = False
    pack: bool = False
    fused_adamw: bool = False
    shape_bucket: int = 1

    def describe(self) -> str:
        on = [name for name in ("compile", "pack", "fused_adamw") if getattr(self, name)]
        return f"{', '.join(on) or 'plain'} (shape bucket {self.shape_bucket})"


def device_type() -> str:
    """The device the engine trains on (as :func:`svqmae.engine.module.trainer_kwargs` picks it)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_speed(t: TrainConfig, device: str | None = None) -> Speed:
    """``train.*`` speed switches -> a :class:`Speed` for ``device`` ("cuda" or "cpu"; default: this machine's)."""
    cuda = (device or device_type()) == "cuda"

    def on(value: str) -> bool:
        return value == "on" or (value == "auto" and cuda)

    bucket = (16 if cuda else 1) if t.shape_bucket == "auto" else int(t.shape_bucket)
    fused = t.fused_adamw == "on" or (t.fused_adamw == "auto" and (device or device_type()) in ("cuda", "cpu"))
    return Speed(on(t.torch_compile), on(t.pack), fused, bucket)


def apply_speed(model, speed: Speed, **compile_kwargs) -> None:
    """Set a :class:`svqmae.model.SVQMAE`'s layout choices and compile its blocks (in place: parameter
    names, checkpoints and saved models are unchanged)."""
    model.pack, model.shape_bucket = speed.pack, speed.shape_bucket
    if speed.compile:
        # a handful of variants per block are normal (encoder and decoder widths, training and evaluation,
        # batches of one utterance); the default limit of 8 would send the rest back to eager mode
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(config, name, max(getattr(config, name), 64))
        for name in ("encoder", "decoder"):
            if hasattr(model, name):
                getattr(model, name).compile_blocks(**compile_kwargs)


def adamw(param_groups, t: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with ``train.lr`` and ``train.betas``; fused (one kernel, device-side skipping) or foreach."""
    return torch.optim.AdamW(param_groups, lr=t.lr, betas=tuple(t.betas), fused=True if fused else None)
