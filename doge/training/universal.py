"""DeepSpeed universal copies of checkpoints: what a resume or `--init-from` loads when the world
size or the expert-parallel size changed.

A module of its own, above both `checkpoint` (the folder format) and `consolidate` (the CDMoE
converter, which reads trainer states): CDMoE checkpoints go through the project's expert-aware
converter, others through DeepSpeed's `ds_to_universal`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from doge import atomic
from doge.training import consolidate


def to_universal(ckpt: Path, out_root: Path) -> Path:
    """Rank 0 only: DeepSpeed universal copy of `ckpt` under `out_root` (the source is only read)."""
    out = out_root / ckpt.name
    if out.is_dir():
        return out
    tmp = atomic.fresh_staging_dir(out)
    if consolidate.handles(ckpt):
        consolidate.write_universal(ckpt, tmp)
        return atomic.publish_dir(tmp, out)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"universal conversion of {ckpt} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return atomic.publish_dir(tmp, out)
