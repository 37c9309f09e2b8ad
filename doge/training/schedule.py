"""Warmup-Stable-Decay (WSD) learning-rate schedule.

The LR is a pure function of (config, step), recomputed at every step instead of being held in a
scheduler object: a resumed or continued run therefore follows the formula exactly, and changing
the decay for a continuation needs no optimizer-state surgery.

    step < warmup                 lr = peak * (step + 1) / warmup
    warmup <= step < decay_start  lr = peak
    decay_start <= step           lr = min + (peak - min) * shape(p),  p = (step - decay_start) / decay_steps

with min = peak * min_lr_ratio and shape(p) falling from 1 at p = 0 to 0 at p = 1
(clamped at p >= 1): linear 1 - p, 1-sqrt 1 - sqrt(p), cosine (1 + cos(pi p)) / 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
}


@dataclass(frozen=True)
class WSD:
    """One WSD schedule; `decay_start` defaults to `max_steps - decay_steps` (decay ends the run)."""

    peak_lr: float
    warmup_steps: int
    decay_steps: int
    max_steps: int
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0
    decay_start: int | None = None

    def __post_init__(self):
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape={self.decay_shape!r}: choose one of {', '.join(DECAY_SHAPES)}")
        if min(self.warmup_steps, self.decay_steps) < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.start_of_decay < self.warmup_steps:
            raise ValueError(
                f"decay starts at step {self.start_of_decay}, before warmup ends at {self.warmup_steps}: "
                "lower --warmup-steps or --decay-steps, raise --max-steps, or set --decay-start")

    @property
    def start_of_decay(self) -> int:
        return self.max_steps - self.decay_steps if self.decay_start is None else self.decay_start

    def __call__(self, step: int) -> float:
        """LR used for the optimizer update of 0-based `step`."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step < self.start_of_decay:
            return self.peak_lr
        floor = self.peak_lr * self.min_lr_ratio
        progress = 1.0 if self.decay_steps == 0 else min(1.0, (step - self.start_of_decay) / self.decay_steps)
        return floor + (self.peak_lr - floor) * DECAY_SHAPES[self.decay_shape](progress)
