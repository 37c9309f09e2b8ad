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

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; first match wins.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                 "RTX 4090": 165e12, "V100": 125e12}


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM appendix B)."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len


def _cpu_peak_per_rank(bf16: bool, local_world: int) -> float:
    """Estimated CPU peak: cores * clock * FLOP/cycle (2 FMA units; AVX-512 or AVX2; x2 with bf16 dot)."""
    flags, mhz = "", 2000.0
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        mhz = float(next(line for line in info.splitlines() if line.startswith("cpu MHz")).split(":")[1])
    except (OSError, StopIteration, ValueError):
        pass
    per_cycle = 64 if " avx512f" in flags else 32
    if bf16 and (" avx512_bf16" in flags or " amx_bf16" in flags):
        per_cycle *= 2
    cores = len(os.sched_getaffinity(0)) / max(1, local_world)
    return cores * mhz * 1e6 * per_cycle


def device_peak_flops(bf16: bool, local_world: int) -> float:
    """Peak FLOP/s of the device one rank uses; DOGE_PEAK_FLOPS overrides the table/estimate."""
    if os.environ.get("DOGE_PEAK_FLOPS"):
        return float(os.environ["DOGE_PEAK_FLOPS"])
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 100e12)
        return peak if bf16 else peak / 2
    return _cpu_peak_per_rank(bf16, local_world)


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Reporter:
    """Rank 0's sink for training and validation metrics."""

    def __init__(self, rundir: Path, max_steps: int, start_step: int, flops_per_token: float,
                 peak_flops: float, wandb_run=None):
        self.path = rundir / "metrics.jsonl"
        self.max_steps, self.flops_per_token, self.peak_flops = max_steps, flops_per_token, peak_flops
        self.wandb_run = wandb_run
        self._truncate(start_step)
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=None)  # a bar on terminals only; logs get the console lines
        self._last = (time.perf_counter(), start_step)

    def _truncate(self, step: int) -> None:
        """Drop lines written after the checkpoint we resume from (those steps are redone)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic.write_text(self.path, "".join(line + "\n" for line in kept))

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def train(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int, tokens_seen: int,
              samples_consumed: int, skipped_steps: int) -> None:
        """One log interval; `tokens` is the number trained since the previous call."""
        now, (then, then_step) = time.perf_counter(), self._last
        self._last = (now, step)
        tok_s = tokens / max(now - then, 1e-9)
        mfu = tok_s * self.flops_per_token / self.peak_flops
        eta = (now - then) / max(step - then_step, 1) * (self.max_steps - step)
        finite = lambda x: x if math.isfinite(x) else None  # JSON has no NaN/inf; skipped steps log null
        self._write(dict(step=step, loss=finite(loss), lr=lr, grad_norm=finite(grad_norm), tokens_seen=tokens_seen,
                         samples_consumed=samples_consumed, tokens_per_s=tok_s, mfu=mfu,
                         skipped_steps=skipped_steps, time=time.time()))
        self.bar.write(f"step {step:>6}/{self.max_steps} | loss {loss:.4f} | lr {lr:.3e} | gnorm {grad_norm:.3f}"
                       f" | {tok_s:,.0f} tok/s | MFU {100 * mfu:.2f}% | ETA {_fmt_duration(eta)}")

    def validation(self, step: int, loss: float) -> None:
        self._write(dict(step=step, val_loss=loss, time=time.time()))
        self.bar.write(f"step {step:>6}/{self.max_steps} | val_loss {loss:.4f}")

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
