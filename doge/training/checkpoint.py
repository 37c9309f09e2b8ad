"""Atomic, self-describing checkpoints: DeepSpeed engine state + the trainer's own state.

Layout of `RUNDIR/checkpoints/`:

    step-00000100/          complete checkpoint (engine files, trainer_state.json, rng/, tokenizer/,
                            manifest.json: every other file's name and size, written last)
    .tmp-step-00000200/     a save in progress or killed mid-write: never read, removed on start
    latest                  text file naming the newest checkpoint, for people and DeepSpeed tools
    universal/step-...      DeepSpeed universal copies, made when the world size changed
    broken/step-...         folders that were not complete (or failed to load), moved aside, never deleted

A checkpoint becomes visible only through the final `rename`, so a crash at any point leaves
either the previous checkpoint or the new one. Completeness is still checked on every start,
because a folder can be damaged later (a lost file, a truncated copy): a checkpoint is complete
when every file its manifest lists is there with its size, and the trainer's state parses.
Resume takes the newest complete folder by step, whatever `latest` says. Folders written before
manifests existed count as complete when trainer_state.json parses (the earlier rule); a loss
they hide shows up at load time, which falls back to the previous checkpoint.
Sizes, not hashes: stat-ing the files costs under a millisecond, while hashing every
checkpoint at each start would re-read gigabytes for the bigger presets.

torch is imported where it is used, so the completeness check (`incomplete_reason`, `scan`,
`find_latest`) runs in the export and upcycle commands before they load anything heavy.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from doge import atomic
from doge.atomic import TMP_PREFIX
from doge.training.faults import pause

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
BROKEN_DIR = "broken"


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
    spikes_in_row: int = 0
    skipped_spikes: int = 0
    recent_losses: list = field(default_factory=list)  # the spike guard's window, oldest first
    recipe: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, ckpt: Path) -> "TrainerState":
        """Raises ValueError naming the file when it is not a trainer state (e.g. truncated)."""
        path = ckpt / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise ValueError(f"{path} is not a trainer state (truncated or edited?): {err}") from err


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA RNG streams."""
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(ckpt: Path, rank: int) -> None:
    """Restore this rank's RNG streams (only meaningful when the world size is unchanged)."""
    with open(ckpt / "rng" / f"rank-{rank:05d}.pkl", "rb") as fh:
        set_rng_state(pickle.load(fh))


def set_rng_state(state: dict) -> None:
    """Put back RNG streams taken by `rng_state`."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(folder: Path) -> None:
    """Name and size of every file in `folder`, written last: its presence marks the save complete."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    atomic.write_json(folder / MANIFEST_FILE, {"files": files})


def incomplete_reason(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a missing or short file, an unreadable state), or None."""
    manifest = ckpt / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError) as err:
            return f"{MANIFEST_FILE} is unreadable ({err})"
        for name, size in files.items():
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    elif not (ckpt / STATE_FILE).is_file():
        return f"neither {MANIFEST_FILE} nor {STATE_FILE} is there"
    try:
        TrainerState.read(ckpt)
    except (OSError, ValueError) as err:
        return str(err)
    return None


def scan(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(incomplete folder, why)])."""
    complete, broken = [], []
    for folder in sorted(root.glob("step-*")) if root.is_dir() else []:
        reason = incomplete_reason(folder)
        if reason is None:
            complete.append(folder)
        else:
            broken.append((folder, reason))
    return complete, broken


def move_aside(folder: Path) -> Path:
    """Rank 0: move a checkpoint folder to `broken/` (numbered if that name is taken); returns where."""
    target = folder.parent / BROKEN_DIR / folder.name
    target.parent.mkdir(exist_ok=True)
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{folder.name}.{n}")
    os.rename(folder, target)
    return target


def save(engine, root: Path, state: TrainerState, tokenizer_dir: str | None, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the completed checkpoint folder."""
    import torch.distributed as dist

    from doge.training.distributed import barrier

    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = step_tag(state.step)
    final = root / tag
    tmp = atomic.staging_path(final)
    if rank == 0:
        atomic.fresh_staging_dir(final)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)
    pause(state.step, "save-engine")
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    with open(tmp / "rng" / f"rank-{rank:05d}.pkl", "wb") as fh:
        pickle.dump(rng_state(), fh)
    pause(state.step, "save-rng")
    barrier()
    if rank == 0:
        _publish(tmp, final, state, tokenizer_dir)
        prune(root, keep_last)
    barrier()
    return final


def _publish(tmp: Path, final: Path, state: TrainerState, tokenizer_dir: str | None) -> None:
    """Rank 0: the trainer state, the manifest last, then the rename and `latest`. A folder already
    under the final name (one that failed to load) is moved aside, never overwritten."""
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    atomic.write_text(tmp / STATE_FILE, json.dumps(asdict(state), indent=1))
    pause(state.step, "save-state")
    write_manifest(tmp)
    pause(state.step, "save-manifest")
    if final.exists():
        move_aside(final)
    atomic.publish_dir(tmp, final)
    pause(state.step, "save-published")
    atomic.write_text(final.parent / "latest", final.name + "\n")
    pause(state.step, "save-latest")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return scan(root)[0]


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint (by step; `latest` may lag behind after a kill)."""
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

