"""A training checkpoint as a Hugging Face folder: what a finished run leaves in RUNDIR/final and
what `python -m doge.export` writes.

The weights are put back together from any ZeRO stage and world size (CDMoE expert tables whole),
saved as fp32 safetensors with config.json and the checkpoint's tokenizer, loadable by stock
`transformers`. The folder is written beside its target and renamed into place, so an interrupted
export never leaves a half-written one.

`source_checkpoint` and `check_outdir` are the command's checks, made before anything heavy is
imported: the checkpoint must pass the trainer's completeness check (every file its manifest
lists, at its size), so a lost or truncated engine file is named instead of failing inside
DeepSpeed or torch. The model, torch and DeepSpeed are imported by `export` itself.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

from doge import atomic
from doge.training import checkpoint as ckpt

CKPT_HINT = "pass a checkpoint folder RUNDIR/checkpoints/step-XXXXXXXX, or a RUNDIR for its newest checkpoint"


class ExportError(ValueError):
    """A checkpoint or output folder the export cannot use; the message names it and the fix."""


def _checkpoints_root(folder: Path) -> Path | None:
    """The checkpoints folder when `folder` is a RUNDIR or a RUNDIR/checkpoints folder, else None."""
    if (folder / "checkpoints").is_dir():
        return folder / "checkpoints"
    if (folder / "latest").is_file() or any(p.is_dir() for p in folder.glob("step-*")):
        return folder
    return None


def source_checkpoint(path: Path) -> Path:
    """The checkpoint `python -m doge.export` reads: `path` itself when it is a checkpoint folder, or
    the newest complete checkpoint when it is a RUNDIR (or RUNDIR/checkpoints). ExportError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"CKPT {path} does not exist: {CKPT_HINT}")
    if not path.is_dir():
        raise ExportError(f"CKPT {path} is a file, not a folder: {CKPT_HINT}")
    is_checkpoint = (path / ckpt.MANIFEST_FILE).is_file() or (path / ckpt.STATE_FILE).is_file()
    root = None if is_checkpoint else _checkpoints_root(path)
    if root is not None:
        complete, broken = ckpt.scan(root)
        if complete:
            return complete[-1]
        why = f" ({broken[-1][0].name}: {broken[-1][1]})" if broken else " (none saved yet)"
        raise ExportError(f"CKPT {path} holds no complete checkpoint{why}: restore the lost file, or train until "
                          "a checkpoint is saved (--save-interval)")
    if not is_checkpoint:
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            raise ExportError(f"CKPT {path} is already a Hugging Face export (config.json + model.safetensors): "
                              f"load it as it is, or {CKPT_HINT}")
        raise ExportError(f"CKPT {path} is not a checkpoint (no {ckpt.MANIFEST_FILE} or {ckpt.STATE_FILE}): "
                          f"{CKPT_HINT}")
    reason = ckpt.incomplete_reason(path)
    if reason:
        others = [p for p in ckpt.complete_checkpoints(path.parent) if p != path]
        fix = f"export an earlier one (e.g. {others[-1]})" if others else "export another checkpoint"
        raise ExportError(f"CKPT {path} is not a complete checkpoint ({reason}): restore the file, or {fix}")
    return path


def check_outdir(outdir: Path, replace: bool = False) -> None:
    """ExportError unless `outdir` can be written: a new (or empty) folder whose parent is writable."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ExportError(f"OUTDIR {outdir} is a file: choose a new folder name")
    if outdir.is_dir() and any(outdir.iterdir()) and not replace:
        raise ExportError(f"OUTDIR {outdir} exists and is not empty: choose a new folder, nothing is overwritten")
    parent = outdir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"OUTDIR {outdir}: {parent} is not a writable folder; choose an OUTDIR you can write")


def export(ckpt_dir: Path, outdir: Path, replace: bool = False) -> Path:
    """Write the complete checkpoint `ckpt_dir` as a Hugging Face folder `outdir` (ExportError when
    the checkpoint is incomplete or unreadable, or `outdir` is taken and `replace` is off)."""
    ckpt_dir, outdir = Path(ckpt_dir), Path(outdir)
    reason = ckpt.incomplete_reason(ckpt_dir)
    if reason:
        raise ExportError(f"{ckpt_dir} is not a complete checkpoint ({reason}); {CKPT_HINT}")
    check_outdir(outdir, replace)
    config = ckpt.TrainerState.read(ckpt_dir).model_config
    return write_folder(config, read_weights(ckpt_dir), ckpt_dir, outdir)


def read_weights(ckpt_dir: Path) -> dict:
    """The checkpoint's full fp32 weights; ExportError naming it when its engine files cannot be read."""
    from doge.training.weights import checkpoint_weights

    try:
        return checkpoint_weights(ckpt_dir)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise ExportError(f"{ckpt_dir}: the engine files cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'}): restore them from a copy, "
                          "or export another checkpoint") from err


def write_folder(config: dict, weights: dict, source: Path, outdir: Path) -> Path:
    """The model of `config` with `weights` (checked complete) and the tokenizer of checkpoint
    `source`, as a Hugging Face folder `outdir`, published whole or not at all."""
    from doge.model.configuration import DogeConfig
    from doge.model.modeling import DogeForCausalLM
    from doge.training.weights import load_checked

    model = DogeForCausalLM(DogeConfig(**config))
    try:
        load_checked(model, weights, source)
    except RuntimeError as err:
        raise ExportError(f"{err}: its {ckpt.STATE_FILE} does not describe its weights; export another "
                          "checkpoint") from err
    tmp = atomic.fresh_staging_dir(outdir)
    try:
        model.save_pretrained(tmp)
        if (source / "tokenizer").is_dir():
            shutil.copytree(source / "tokenizer", tmp, dirs_exist_ok=True)
        return atomic.publish_dir(tmp, outdir, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
