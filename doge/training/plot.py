"""A run's loss and LR curves, RUNDIR/loss.png from RUNDIR/metrics.jsonl: drawn at the end of every
completed run, and on demand by `python -m doge.plot RUNDIR` (e.g. while a run is going)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(rundir: Path) -> Path:
    rundir = Path(rundir)
    records = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    fig.suptitle(rundir.name)
    out = rundir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
