"""A model's full weights from where training leaves them: a checkpoint (any ZeRO stage, any world
size, CDMoE expert tables sharded or not) or a Hugging Face export folder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from doge.training import consolidate
from doge.training.checkpoint import STATE_FILE


def checkpoint_weights(ckpt: Path) -> dict:
    """The full fp32 weights of a checkpoint under the model's own names (expert tables whole)."""
    if consolidate.handles(ckpt):
        return consolidate.read(ckpt).weights
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    logging.getLogger("deepspeed").setLevel(logging.WARNING)
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def load_checked(model: torch.nn.Module, weights: dict, source: Path) -> None:
    """`weights` into `model`; every parameter must be there (the tied LM head may be absent)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{source}: weights do not match the model config: missing {missing}, "
                           f"unexpected {unexpected}")


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """An HF export's model.safetensors, or a checkpoint's full fp32 weights, into `model`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = (checkpoint_weights(folder) if (folder / STATE_FILE).is_file()
               else load_file(str(folder / "model.safetensors")))
    load_checked(model, weights, folder)
