"""Learning-rate schedules, as multipliers of ``train.lr`` per optimizer step (for ``LambdaLR``), and the
training clock that time budgets run on."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ..config import FinetuneConfig, TrainConfig


class TrainClock:
    """Seconds of training so far, across resumes: ``offset`` (saved in checkpoints) plus the time since
    :meth:`start`. ``now`` (a monotonic clock in seconds) can be replaced, e.g. by tests."""

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self.now, self.offset, self.started = now, 0.0, None

    def start(self) -> None:
        self.started = self.now()

    def elapsed(self) -> float:
        return self.offset + (self.now() - self.started if self.started is not None else 0.0)


def warmup_cosine(t: TrainConfig, elapsed: Callable[[], float] | None = None):
    """Linear warm-up over ``t.warmup_steps``, then cosine decay to ``t.min_lr_ratio`` when the run's
    progress reaches 1: progress = max((step - warm-up) / (max_steps - warm-up), elapsed / budget), the
    time part with ``t.max_minutes`` and ``t.time_schedule`` (``elapsed()``: seconds trained so far),
    so that whichever budget binds first also ends the decay. Without a time budget this is the
    step-only schedule of earlier versions, exactly."""
    budget = t.max_minutes * 60 if t.time_schedule and t.max_minutes > 0 and elapsed is not None else 0.0

    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
        progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
        if budget:
            progress = max(progress, elapsed() / budget)
        progress = min(1.0, max(0.0, progress))
        return warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

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
