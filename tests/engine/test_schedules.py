"""Learning-rate schedules (svqmae.engine.schedules)."""

import math

import pytest

from svqmae import config as C
from svqmae.engine.schedules import TrainClock, tristage, warmup_cosine


def test_warmup_cosine_rises_linearly_then_decays_to_the_floor():
    t = C.TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    f = warmup_cosine(t)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way through the decay: the mean of 1 and the floor
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_tristage_warms_holds_and_decays_exponentially():
    f = tristage(C.resolve_finetune("tiny", overrides=["train.max_steps=100"]))
    assert f(0) < 0.15 and f(9) == 1.0 and f(30) == 1.0 and f(49) == 1.0
    assert f(75) < 1.0 and abs(f(99) - 0.05) < 0.01 and f(500) == pytest.approx(0.05)


def test_with_a_time_budget_the_schedule_decays_over_the_minutes_too():
    t = C.TrainConfig(warmup_steps=10, max_steps=100_000, min_lr_ratio=0.1, max_minutes=10)
    clock = {"s": 0.0}
    f = warmup_cosine(t, lambda: clock["s"])
    assert f(4) == pytest.approx(0.5)  # warm-up by steps, as before
    assert f(50) == pytest.approx(1.0)
    clock["s"] = 300  # half the budget: half-way through the decay, whatever the step
    assert f(50) == pytest.approx(0.55)
    clock["s"] = 600
    assert f(60) == pytest.approx(0.1) and f(61) == pytest.approx(0.1)
    # the steps bind first: the time part does not slow the decay
    t2 = C.TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1, max_minutes=1000)
    assert warmup_cosine(t2, lambda: 1.0)(60) == pytest.approx(0.55)
    # without a budget (or with time_schedule off) the clock is never read: the step-only schedule, exactly
    def old(s):  # the schedule of earlier versions
        return (s + 1) / 10 if s < 10 else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 10) / 100)))

    for cfg in (C.TrainConfig(warmup_steps=10, max_steps=110),
                C.TrainConfig(warmup_steps=10, max_steps=110, max_minutes=5, time_schedule=False)):
        g = warmup_cosine(cfg, lambda: 1 / 0)
        assert [g(s) for s in range(130)] == [old(s) for s in range(130)]


def test_the_training_clock_adds_what_checkpoints_carry():
    now = {"t": 100.0}
    clock = TrainClock(lambda: now["t"])
    clock.offset = 42.0  # restored from a checkpoint
    assert clock.elapsed() == 42.0
    clock.start()
    now["t"] = 130.0
    assert clock.elapsed() == 72.0
