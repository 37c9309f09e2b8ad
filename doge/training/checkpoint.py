"""Atomic, self-describing checkpoints: DeepSpeed engine state + the trainer's own state.

Layout of `RUNDIR/checkpoints/`:

    step-00000100/          complete checkpoint (engine files, trainer_state.json, rng/, tokenizer/)
    .tmp-step-00000200/     a save in progress or killed mid-write: never read, removed on start
    latest                  text file naming the newest complete checkpoint, written last
    universal/step-...      DeepSpeed universal copies, made when the world size changed

A checkpoint becomes visible only through the final `rename`, so a crash at any point leaves
either the previous checkpoint or the new one, never a half-written folder under a real name.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from doge import atomic
from doge.atomic import TMP_PREFIX
from doge.training.distributed import barrier

STATE_FILE = "trainer_state.json"
SLOW_SAVE_ENV = "DOGE_FAULT_SLOW_SAVE"  # fault injection for tests: "STEP:SECONDS" sleeps inside that save


@dataclass
class TrainerState:
    """Everything besides engine tensors that a resume needs; saved as JSON for humans too."""

    data_fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    step: int = 0
    samples_consumed: int = 0
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    world_size: int = 1
    bad_steps_in_row: int = 0
    skipped_steps: int = 0
    recipe: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, ckpt: Path) -> "TrainerState":
        return cls(**json.loads((ckpt / STATE_FILE).read_text()))


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(ckpt: Path, rank: int) -> None:
    """Restore this rank's RNG streams (only meaningful when the world size is unchanged)."""
    with open(ckpt / "rng" / f"rank-{rank:05d}.pkl", "rb") as fh:
        state = pickle.load(fh)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _injected_delay(step: int) -> None:
    """Let a test kill -9 the job while a checkpoint is half written."""
    fault = os.environ.get(SLOW_SAVE_ENV, "")
    if fault and int(fault.split(":")[0]) == step:
        time.sleep(float(fault.split(":")[1]))


def save(engine, root: Path, state: TrainerState, tokenizer_dir: str | None, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the completed checkpoint folder."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = step_tag(state.step)
    final = root / tag
    tmp = atomic.staging_path(final)
    if rank == 0:
        atomic.fresh_staging_dir(final)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    with open(tmp / "rng" / f"rank-{rank:05d}.pkl", "wb") as fh:
        pickle.dump(_rng_state(), fh)
    barrier()
    if rank == 0:
        if tokenizer_dir:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        atomic.write_text(tmp / STATE_FILE, json.dumps(asdict(state), indent=1))
        _injected_delay(state.step)
        atomic.publish_dir(tmp, final)
        atomic.write_text(root / "latest", tag + "\n")
        prune(root, keep_last)
    barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names; the newest complete one if `latest` is missing or stale."""
    pointer = root / "latest"
    if pointer.is_file():
        ckpt = root / pointer.read_text().strip()
        if (ckpt / STATE_FILE).is_file():
            return ckpt
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    """Drop leftovers of killed saves, checkpoints beyond the newest `keep_last`, stale universal copies."""
    if not root.is_dir():
        return
    for tmp in root.glob(TMP_PREFIX + "step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    found = complete_checkpoints(root)
    for old in found[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    kept = {p.name for p in complete_checkpoints(root)}
    for uni in (root / "universal").glob("step-*") if (root / "universal").is_dir() else []:
        if uni.name not in kept:
            shutil.rmtree(uni)


def to_universal(ckpt: Path, out_root: Path) -> Path:
    """Rank 0 only: DeepSpeed universal copy of `ckpt` under `out_root` (the source is only read)."""
    out = out_root / ckpt.name
    if out.is_dir():
        return out
    tmp = atomic.fresh_staging_dir(out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"universal conversion of {ckpt} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return atomic.publish_dir(tmp, out)
