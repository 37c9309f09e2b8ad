"""Fault injection for the kill tests: a named point in the trainer can be made to pause.

`DOGE_FAULT_PAUSE="POINT:STEP[:SECONDS]"` makes every rank that reaches POINT during optimizer
step STEP print `fault pause: POINT step STEP` and sleep (an hour by default), so a test can
kill -9 the job exactly there: mid-step, mid-evaluation, or between any two files of a save.
Unset, `pause` is one dictionary lookup.

`DOGE_FAULT_STEP_SECONDS="SECONDS"` makes every optimizer step take at least SECONDS of wall time
(a sleep before the next step: no number changes, so a run stays bit-identical), so a time-limit
test knows how long the run takes however fast the machine is. Unset, `pace` is one lookup.
"""
from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "DOGE_FAULT_PAUSE"
STEP_SECONDS_ENV = "DOGE_FAULT_STEP_SECONDS"
_last_step_start: list[float] = []


def pause(point: str, step: int) -> None:
    fault = os.environ.get(PAUSE_ENV, "").split(":")
    if len(fault) >= 2 and fault[0] == point and int(fault[1]) == step:
        print(f"fault pause: {point} step {step}", file=sys.stderr, flush=True)
        time.sleep(float(fault[2]) if len(fault) > 2 else 3600.0)


def pace() -> None:
    """Called at the start of every step: sleeps until SECONDS after the previous call (none before the first)."""
    seconds = os.environ.get(STEP_SECONDS_ENV)
    if not seconds:
        return
    if _last_step_start:
        time.sleep(max(0.0, _last_step_start[-1] + float(seconds) - time.monotonic()))
    _last_step_start[:] = [time.monotonic()]
