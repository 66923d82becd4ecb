"""Learning-rate schedules, as multipliers of ``train.lr`` per optimizer step (for ``LambdaLR``)."""

from __future__ import annotations

import math

from ..config import FinetuneConfig, TrainConfig


def warmup_cosine(t: TrainConfig):
    """Linear warm-up over ``t.warmup_steps``, then cosine decay to ``t.min_lr_ratio`` at ``t.max_steps``."""

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


lr_lambda = warmup_cosine  # the name earlier versions used


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
