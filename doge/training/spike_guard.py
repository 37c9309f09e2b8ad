"""The loss-spike guard (`--spike-sigma`): a step whose loss jumps far above the recent ones is not applied.

A step's loss (the back-propagated one, the mean over its micro-batches and over all ranks) is
known after the last micro-batch's forward, before its backward. The loop all-reduces it there and
the guard compares it with mean + sigma x std of the losses of the last `--spike-window` applied
steps. For a spike the loop back-propagates the last micro-batch's loss times NaN: the step's
gradients become non-finite, so the skip that already guards non-finite steps (DeepSpeed's
overflow check, or `doge.training.engine.guard_on_device`) leaves weights, Adam moments and step
count untouched, with no optimizer plumbing of its own. Every rank decides alike: same all-reduced
loss, same window.

Nothing is read back per step: the window is a fixed-size device tensor, NaN until it is full (a
comparison with NaN is false, so no step is judged before), and the decision travels with the
step's other metrics as one device tensor `[spiked, loss, mean, std]`, read when the loop reads
them (`Trainer.settle`), which counts, logs and stops. A step costs one all-reduce of one number
and a few element-wise operations; the window is read back only when a checkpoint is saved.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


class SpikeGuard:
    """The window of recent applied steps' losses (oldest first) and the rule that judges a step."""

    def __init__(self, sigma: float, size: int, recent: list[float], device):
        kept = torch.tensor(recent[-size:], dtype=torch.float32)
        self.sigma = sigma
        self.losses = torch.cat((torch.full((size - len(kept),), math.nan), kept)).to(device)

    def judge(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factor for the last micro-batch's loss: 1, or NaN for a spike; the check
        `[spiked, loss, mean, std]`) of a step whose mean loss over ranks is `loss` (shape (1,))."""
        var, mean = torch.var_mean(self.losses)  # not Tensor.std, whose CPU kernel reads a value back
        std = var.sqrt()
        spiked = (loss > mean + self.sigma * std).reshape(())
        return torch.where(spiked, math.nan, 1.0), torch.stack((spiked.float(), loss.reshape(()), mean, std))

    def push(self, check: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """After the step: its loss joins the window if the update was applied (no spike, finite
        loss and gradient norm)."""
        applied = (check[0] == 0) & torch.isfinite(check[1]) & torch.isfinite(grad_norm)
        self.losses = torch.where(applied, torch.cat((self.losses[1:], check[1:2])), self.losses)

    def recent(self) -> list[float]:
        """The window's losses, oldest first, for the trainer state (a host read: at saves only)."""
        return [x for x in self.losses.tolist() if not math.isnan(x)]


def skip_line(step: int, loss: float, mean: float, std: float, sigma: float, in_row: int) -> str:
    return (f"step {step}: loss spike {loss:.4f} > mean {mean:.4f} + {sigma:g} x std {std:.4f} of the recent "
            f"steps, update skipped ({in_row} in a row)")


def stop_line(recipe, in_row: int, latest: Path | None) -> str:
    """Why the run stops, the flags that set it, and where to go back to."""
    where = (f"the last checkpoint, {latest}, holds weights from before them (a skipped step changes none)"
             if latest else "no checkpoint was saved yet")
    return (f"{in_row} loss spikes in a row (--spike-max-skips {recipe.spike_max_skips}, --spike-sigma "
            f"{recipe.spike_sigma:g}, --spike-window {recipe.spike_window}): lower --lr, raise --warmup-steps, check "
            f"the data or raise --spike-sigma; {where}")
