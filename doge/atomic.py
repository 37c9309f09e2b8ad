"""Atomic writes: readers see either the old content or the complete new one, even after kill -9.

Every file or folder this project publishes (shards, manifests, checkpoints, `latest`, metrics,
exports, tokenizers, upcycled models) goes through these helpers, so there is one temp-name
convention: `.tmp-NAME` beside the target, made visible by one `rename` after an fsync.
Leftover `.tmp-*` entries are the remains of killed writes and are never read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"


def staging_path(target: Path) -> Path:
    """Where `target` is written before it is renamed into place (same folder, so same filesystem)."""
    target = Path(target)
    return target.with_name(TMP_PREFIX + target.name)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write to the staging name, fsync, then rename over `path`."""
    path = Path(path)
    tmp = staging_path(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    """JSON with sorted keys and a trailing newline, so equal content gives equal bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fresh_staging_dir(target: Path) -> Path:
    """An empty staging folder for `target` (the remains of an earlier killed write are removed)."""
    tmp = staging_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def publish_dir(staged: Path, target: Path, replace: bool = False) -> Path:
    """Rename the finished folder `staged` to `target` in one step.

    With `replace`, an existing `target` is first renamed aside and removed only after the new one
    is in place, so at every instant either the old or the new folder is complete.
    """
    staged, target = Path(staged), Path(target)
    fsync_dir(staged)
    old = None
    if target.exists():
        if not replace:
            raise FileExistsError(f"{target} exists; choose another output folder")
        old = target.with_name(TMP_PREFIX + "old-" + target.name)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)
    return target
