"""Learning-rate schedules (svqmae.engine.schedules)."""

import pytest

from svqmae import config as C
from svqmae.engine.schedules import tristage, warmup_cosine


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
