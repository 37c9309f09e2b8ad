"""WSD schedule: the formula at every step for each decay shape, and config errors."""
import math

import pytest

from doge.training.schedule import WSD


def expected(step, peak, warmup, decay, total, shape, ratio, decay_start=None):
    start = total - decay if decay_start is None else decay_start
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < start:
        return peak
    p = min(1.0, (step - start) / decay)
    f = {"linear": 1 - p, "1-sqrt": 1 - math.sqrt(p), "cosine": 0.5 * (1 + math.cos(math.pi * p))}[shape]
    return peak * ratio + (peak - peak * ratio) * f


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
@pytest.mark.parametrize("ratio", [0.0, 0.1])
def test_every_step_matches_formula(shape, ratio):
    wsd = WSD(8e-3, warmup_steps=800, decay_steps=800, max_steps=8000, decay_shape=shape, min_lr_ratio=ratio)
    for step in range(8000):
        assert wsd(step) == pytest.approx(expected(step, 8e-3, 800, 800, 8000, shape, ratio), rel=1e-12, abs=1e-15)


def test_phases_and_end_points():
    wsd = WSD(1.0, warmup_steps=10, decay_steps=20, max_steps=100, min_lr_ratio=0.1)
    assert wsd(0) == pytest.approx(0.1) and wsd(9) == 1.0
    assert {wsd(s) for s in range(10, 80)} == {1.0}
    assert wsd(80) == 1.0 and wsd(99) == pytest.approx(0.1 + 0.9 * (1 / 20))
    assert wsd(100) == pytest.approx(0.1) and wsd(10_000) == pytest.approx(0.1)


def test_explicit_decay_start():
    wsd = WSD(1.0, warmup_steps=0, decay_steps=10, max_steps=100, decay_start=40)
    assert wsd(39) == 1.0 and wsd(45) == pytest.approx(0.5) and wsd(50) == 0.0 and wsd(99) == 0.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(decay_shape="exp"), "decay_shape"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(warmup_steps=90), "warmup"),
])
def test_bad_config_names_the_field(kwargs, field):
    base = dict(peak_lr=1.0, warmup_steps=10, decay_steps=20, max_steps=100)
    with pytest.raises(ValueError, match=field):
        WSD(**{**base, **kwargs})
