"""Checkpoint averaging: the element-wise mean of the fp32 weights of several checkpoints of one run.

Averaging the last checkpoints of a WSD decay (or of a stable phase) is a cheap way to a flatter,
often better model: no training, one pass over the weights. The checkpoints must hold the same
model (the same config): averaging two architectures, or two runs' unrelated weights, would give a
silently meaningless model, so a different config is refused. Each checkpoint's full weights are
read as the export reads them (any ZeRO stage, any world size, expert tables whole) and summed in
fp32 one checkpoint at a time, so memory holds two copies of the weights, not K.
"""
from __future__ import annotations

from pathlib import Path

import torch

from doge.training import checkpoint as ckpt
from doge.training.export import check_outdir, read_weights, write_folder


class AverageError(ValueError):
    """Checkpoints that cannot be averaged; the message names them and the fix."""


def last_checkpoints(rundir: Path, count: int) -> list[Path]:
    """The newest `count` complete checkpoints of RUNDIR, oldest first."""
    if count < 1:
        raise AverageError(f"--last {count}: give the number of checkpoints to average, at least 1")
    found = ckpt.complete_checkpoints(Path(rundir) / "checkpoints")
    if len(found) < count:
        raise AverageError(f"--last {count}: {rundir} holds {len(found)} complete checkpoint(s) "
                           f"({', '.join(p.name for p in found) or 'none'}); pass --last {len(found) or 1} "
                           "or train longer with a smaller --save-interval and a larger --keep-last")
    return found[-count:]


def model_configs(ckpts: list[Path]) -> dict:
    """The one model config the checkpoints share (refuses differing ones, naming both)."""
    configs = {}
    if len({path.resolve() for path in ckpts}) < len(ckpts):
        raise AverageError(f"{', '.join(map(str, ckpts))}: a checkpoint is named twice; name each once")
    for path in ckpts:
        if ckpt.incomplete_reason(path) is not None:
            raise AverageError(f"{path}: not a complete checkpoint ({ckpt.incomplete_reason(path)}); "
                               "pass RUNDIR/checkpoints/step-XXXXXXXX folders that a run finished saving")
        configs[path] = ckpt.TrainerState.read(path).model_config
    first, config = next(iter(configs.items()))
    for path, other in configs.items():
        if other != config:
            keys = sorted(k for k in set(config) | set(other) if config.get(k) != other.get(k))
            raise AverageError(f"{path} holds another model than {first} (config differs in "
                               f"{', '.join(keys)}); average checkpoints of one run only")
    return config


def average_weights(ckpts: list[Path]) -> dict[str, torch.Tensor]:
    """fp32 mean of the checkpoints' full weights, by name."""
    total: dict[str, torch.Tensor] = {}
    for path in ckpts:
        weights = read_weights(path)
        if total and set(weights) != set(total):
            raise AverageError(f"{path}: its weights' names differ from {ckpts[0]}'s; average checkpoints of "
                               "one run only")
        for name, tensor in weights.items():
            if name in total:
                total[name] += tensor.float()
            else:
                total[name] = tensor.float().clone()
    return {name: tensor / len(ckpts) for name, tensor in total.items()}


def average(ckpts: list[Path], outdir: Path) -> Path:
    """The mean of `ckpts` as a Hugging Face folder `outdir` with the newest checkpoint's tokenizer.
    Everything that can be refused is refused before any weights are read."""
    ckpts, outdir = [Path(p) for p in ckpts], Path(outdir)
    config = model_configs(ckpts)
    check_outdir(outdir)
    newest = max(ckpts, key=lambda path: ckpt.TrainerState.read(path).step)
    return write_folder(config, average_weights(ckpts), newest, outdir)
