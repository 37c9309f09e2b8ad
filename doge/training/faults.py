"""Fault injection for the kill tests: a named point in the trainer can be made to pause.

`DOGE_FAULT_PAUSE="POINT:STEP[:SECONDS]"` makes every rank that reaches POINT during optimizer
step STEP print `fault pause: POINT step STEP` and sleep (an hour by default), so a test can
kill -9 the job exactly there: mid-step, mid-evaluation, or between any two files of a save.
Unset, `pause` is one dictionary lookup.
"""
from __future__ import annotations

import os
import sys
import time

PAUSE_ENV = "DOGE_FAULT_PAUSE"


def pause(point: str, step: int) -> None:
    fault = os.environ.get(PAUSE_ENV, "").split(":")
    if len(fault) >= 2 and fault[0] == point and int(fault[1]) == step:
        print(f"fault pause: {point} step {step}", file=sys.stderr, flush=True)
        time.sleep(float(fault[2]) if len(fault) > 2 else 3600.0)
