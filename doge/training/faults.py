"""Fault injection and tracing for the tests, every hook in one place with one call shape.

Each hook is called as `faults.NAME(step, ...)`, `step` being the optimizer step it runs in (or has
just finished), and is driven by one environment variable; unset, a hook costs one lookup and
changes nothing, so a run with none set is the plain trainer.

`DOGE_FAULT_PAUSE="POINT:STEP[:SECONDS]"` (`pause`) makes every rank that reaches POINT during
optimizer step STEP print `fault pause: POINT step STEP` and sleep (an hour by default), so a test
can kill -9 the job exactly there: mid-step, mid-evaluation, or between any two files of a save.

`DOGE_FAULT_STEP_SECONDS="SECONDS"` (`pace`) makes every optimizer step take at least SECONDS of
wall time (a sleep before the next step: no number changes, so a run stays bit-identical), so a
time-limit test knows how long the run takes however fast the machine is.

`DOGE_FAULT_NAN_STEPS="5,6"` (`poison`) makes those steps' loss and metrics NaN, so the guards
against non-finite steps (DeepSpeed's, or the device-side one) are tested on a real run.

`DOGE_FAULT_SPIKE_STEPS="7,9"` (`spike`) multiplies those steps' loss (what is back-propagated,
and the reported `loss`) by `SPIKE_FACTOR`, so the loss-spike guard (`--spike-sigma`) sees a real
spike, and a run without it trains on one.

`DOGE_FAULT_SYNC_PROBE="STEP"` (`sync_probe`) profiles optimizer step STEP on every rank and
writes, to `RUNDIR/sync-probe/rank-R.json`, how many dispatched operations in it force the host to
wait for the device (`SYNC_OPS`, device-to-host copies, explicit synchronisations) and how many
operations were seen in all, so a test proves the step never waits.

`DOGE_FAULT_STRICT_COMPILE="STEP"` (`after_step`) sets `torch.compiler.set_stance(
"fail_on_recompile")` after optimizer step STEP: any later recompilation of a compiled layer ends
the run with dynamo's error.

`DOGE_TRACE_SAMPLES="FOLDER"` (`trace`) makes each rank append the token rows it trains on to
FOLDER/rank-R.jsonl, one line per step: {"step", "first": the global index of its first sample,
"rows"}, so a test compares what was consumed with the data itself.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

PAUSE_ENV = "DOGE_FAULT_PAUSE"
STEP_SECONDS_ENV = "DOGE_FAULT_STEP_SECONDS"
NAN_STEPS_ENV = "DOGE_FAULT_NAN_STEPS"
SPIKE_STEPS_ENV = "DOGE_FAULT_SPIKE_STEPS"
SPIKE_FACTOR = 50.0
SYNC_PROBE_ENV = "DOGE_FAULT_SYNC_PROBE"
STRICT_COMPILE_ENV = "DOGE_FAULT_STRICT_COMPILE"
TRACE_ENV = "DOGE_TRACE_SAMPLES"
# Dispatches that read a device value on the host (or size a result by the data, which does too).
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::unique",
            "aten::_unique2", "aten::bincount", "aten::repeat_interleave.Tensor")
SYNC_EVENTS = ("Memcpy DtoH", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_step_started: dict[int, float] = {}


def pause(step: int, point: str) -> None:
    fault = os.environ.get(PAUSE_ENV, "").split(":")
    if len(fault) >= 2 and fault[0] == point and int(fault[1]) == step:
        print(f"fault pause: {point} step {step}", file=sys.stderr, flush=True)
        time.sleep(float(fault[2]) if len(fault) > 2 else 3600.0)


def pace(step: int) -> None:
    """Before step `step`: sleeps until SECONDS after the previous step began (none before a run's first)."""
    seconds = os.environ.get(STEP_SECONDS_ENV)
    if not seconds:
        return
    if step - 1 in _step_started:
        time.sleep(max(0.0, _step_started.pop(step - 1) + float(seconds) - time.monotonic()))
    _step_started[step] = time.monotonic()


def poison(step: int, loss, metrics: dict) -> tuple:
    """(loss, metrics) of a micro-batch of step `step`, NaN when the step is listed."""
    if str(step) not in os.environ.get(NAN_STEPS_ENV, "").split(","):
        return loss, metrics
    nan = float("nan")
    return loss * nan, {k: v * nan for k, v in metrics.items()}


def spike(step: int, loss, metrics: dict) -> tuple:
    """(loss, metrics) of a micro-batch of step `step`, the loss SPIKE_FACTOR times larger when the step is listed."""
    if str(step) not in os.environ.get(SPIKE_STEPS_ENV, "").split(","):
        return loss, metrics
    return loss * SPIKE_FACTOR, {**metrics, "loss": metrics["loss"] * SPIKE_FACTOR}


@contextmanager
def sync_probe(step: int, rundir: Path, rank: int):
    """Profile the enclosed code when `step` is the probed one; write what forced a host wait."""
    if os.environ.get(SYNC_PROBE_ENV) != str(step):
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    events = prof.events()
    on_cpu = not torch.cuda.is_available()
    syncs = Counter(e.name for e in events if (e.name in SYNC_OPS or any(s in e.name for s in SYNC_EVENTS))
                    and not (on_cpu and _inside_fused_optimizer(e)))
    out = Path(rundir) / "sync-probe" / f"rank-{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"step": step, "operations": len(events), "syncs": dict(syncs)}))


def _inside_fused_optimizer(event) -> bool:
    """Whether a profiled operation ran inside the fused AdamW's step. Its CPU kernel reads the
    step count and `found_inf` from host memory (an `item` on a host tensor); on a GPU the same
    tensors live on the device and the kernel reads them there, so nothing waits."""
    while event is not None:
        if event.name.startswith("Optimizer.step#"):
            return True
        event = event.cpu_parent
    return False


def after_step(step: int) -> None:
    """Called after every optimizer step: turns recompiles into errors once the probed step is done."""
    if os.environ.get(STRICT_COMPILE_ENV) == str(step):
        import torch

        torch.compiler.set_stance("fail_on_recompile")


def trace(step: int, rank: int, first: int, batches: list[dict]) -> None:
    """Append this rank's rows of step `step` (micro-batches `batches`, from global sample `first`)."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    rows = [row for batch in batches for row in batch["input_ids"].tolist()]
    with open(Path(folder) / f"rank-{rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"step": step, "first": first, "rows": rows}) + "\n")
