"""What a run reports: console line, `metrics.jsonl`, W&B, progress bar, MFU. Rank 0 only.

`metrics.jsonl` is the run's history of record (the plot and the tests read it). On resume it is
cut back to the resumed step, so after any number of crashes it reads like one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from doge import atomic


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Throughput:
    """Tokens/s, MFU and ETA between two log lines (rank 0's wall clock)."""

    def __init__(self, start_step: int, max_steps: int, flops_per_token: float, peak_flops: float):
        self.max_steps, self.flops_per_token, self.peak_flops = max_steps, flops_per_token, peak_flops
        self._last = (time.perf_counter(), start_step)
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def exclude(self, seconds: float) -> None:
        """Time spent off training (benchmark scoring) is left out of the next tokens/s, MFU and ETA."""
        then, step = self._last
        self._last = (then + seconds, step)

    def read(self, step: int) -> dict:
        """Metrics since the previous read; resets the count."""
        now, (then, then_step) = time.perf_counter(), self._last
        tok_s = self.tokens / max(now - then, 1e-9)
        self._last, self.tokens = (now, step), 0
        eta = (now - then) / max(step - then_step, 1) * (self.max_steps - step)
        out = {"tokens_per_s": tok_s, "mfu": tok_s * self.flops_per_token / self.peak_flops, "eta_s": eta}
        if torch.cuda.is_available():  # the allocator's own count: no device sync
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return out


# Console formats of the common metrics, in line order; any other metric follows as `name value`.
CONSOLE = {"loss": "loss {:.4f}", "val_loss": "val_loss {:.4f}", "lr": "lr {:.3e}", "grad_norm": "gnorm {:.3f}",
           "tokens_per_s": "{:,.0f} tok/s", "mfu": "MFU {:.2%}", "peak_memory_gb": "{:.1f} GB", "eta_s": None}
# in metrics.jsonl, not on the console
QUIET = {"tokens_seen", "samples_consumed", "skipped_steps", "skipped_spikes", "time"}


def _finite(value):
    """JSON has no NaN/inf: a non-finite metric (a skipped step) is logged as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def console_line(step: int, max_steps: int, metrics: dict) -> str:
    parts = [f"step {step:>6}/{max_steps}"]
    for key, fmt in CONSOLE.items():
        if key in metrics and fmt:
            value = metrics[key]
            parts.append(fmt.format(value) if value is not None else f"{key} null")
    parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
              if k not in CONSOLE and k not in QUIET]
    if "eta_s" in metrics:
        parts.append(f"ETA {_fmt_duration(metrics['eta_s'])}")
    return " | ".join(parts)


class Reporter:
    """Rank 0's sink for metrics: console line, metrics.jsonl, W&B, progress bar."""

    def __init__(self, rundir: Path, max_steps: int, start_step: int, wandb_run=None):
        self.path = rundir / "metrics.jsonl"
        self.max_steps, self.wandb_run = max_steps, wandb_run
        self._truncate(start_step)
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None)  # a bar on terminals only; logs get the console lines

    def _truncate(self, step: int) -> None:
        """Drop lines written after the checkpoint we resume from (those steps are redone)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def log(self, step: int, metrics: dict) -> None:
        """One record: a metrics.jsonl line (non-finite values as null), W&B, a console line."""
        record = {"step": step, **{k: _finite(v) for k, v in metrics.items()}, "time": time.time()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))})
        self.bar.write(console_line(step, self.max_steps, metrics))

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(mode: str, project: str, rundir: Path, run_id: str | None, config: dict):
    """W&B run kept across restarts by id; files stay in RUNDIR. `mode` auto = online iff a key is set."""
    if mode == "off":
        return None
    import wandb

    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    os.environ.setdefault("WANDB_DIR", str(rundir))
    os.environ.setdefault("WANDB_CACHE_DIR", str(rundir / "wandb-cache"))
    os.environ.setdefault("WANDB_CONFIG_DIR", str(rundir / "wandb-config"))
    return wandb.init(project=project, dir=str(rundir), id=run_id or uuid.uuid4().hex[:12], resume="allow",
                      mode=mode, config=config, name=rundir.name)
