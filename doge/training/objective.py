"""The seam between the training loop and what is trained.

The loop (`doge.training.loop`) owns everything every objective needs: the DeepSpeed engine, the
LR schedule, gradient accumulation, guards against non-finite steps, logging, evaluation rounds,
checkpoints and stop signals. An `Objective` owns only its data and its loss: which micro-batches
make up the next optimizer step, what one micro-batch's loss and metrics are, which batches are
held out for evaluation. It never sees DeepSpeed, ranks' collectives or the checkpoint format.
It also declares its configuration (`recipe_class`: the run's flags, YAML keys and defaults) and
what a resume must keep (`fingerprint` of the data, `resume_fields` of the recipe), which
`doge.training.preflight` checks before anything starts.

Pre-training (`doge.training.pretrain`) is one objective; another (e.g. fine-tuning on chat
data) is a subclass plus a three-line entry script calling `doge.training.cli.main`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from doge.model.configuration import DogeConfig
from doge.training.checkpoint import TrainerState
from doge.training.distributed import Dist
from doge.training.recipe import Recipe

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainedModel:
    """The model being trained, as an objective sees it: a forward call, the model's config, and
    the expert group its CDMoE tables are sharded over (None when every rank holds them whole).
    The loop builds it around the DeepSpeed engine once, so an objective reads no attribute off the
    engine or the model; a plain model serves too: `TrainedModel(model, model.config)`."""

    forward: Callable[..., Any]
    config: DogeConfig
    expert_group: Any = None

    def __call__(self, **inputs):
        return self.forward(**inputs)


class Objective(ABC):
    """What is trained. Built by `open` before any process group exists."""

    #: the recipe this objective is configured by: its fields are the run's flags and YAML keys
    recipe_class: type[Recipe]
    #: recipe fields a resume must keep, besides the model (--model, model_overrides) and the data;
    #: every objective keeps expert_lr_scale, which sets the optimizer's parameter groups
    resume_fields: tuple[str, ...] = ("expert_lr_scale",)
    #: data identity, checked by preflight on resume (same data) and continuation (same tokenizer)
    fingerprint: str
    tokenizer_fingerprint: str
    #: the tokenizer folder copied into every checkpoint and export (None if the data has none)
    tokenizer_dir: Path | None
    #: micro-batches vary in length (rows cut to their longest): compiled layers mark it dynamic
    variable_length: bool = False

    @classmethod
    def resolve(cls, data: str, recipe: Recipe, rundir: Path) -> None:
        """Fill the recipe fields that follow from the data or the model rather than from flags
        (a chat run's seq_len, DPO's reference fingerprint), before any other check; raise
        `ConfigError` naming the fix. Cheap: it runs on every rank before every start."""

    @classmethod
    @abstractmethod
    def open(cls, data: str, recipe: Recipe, model_config, source: TrainerState | None) -> "Objective":
        """Open and check the data against the model and the start (`source`: the state of the
        checkpoint being loaded, None for fresh weights); raise `ConfigError` naming the fix."""

    @abstractmethod
    def train_batches(self, samples_consumed: int, global_batch: int, dist: Dist, micro: int) -> list[Batch]:
        """This rank's micro-batches of the optimizer step that starts at global sample
        `samples_consumed` and spans `global_batch` samples over all ranks."""

    @abstractmethod
    def eval_batches(self, dist: Dist, micro: int, max_samples: int) -> list[Batch]:
        """This rank's share of the held-out batches, the same number on every rank (may be none)."""

    @abstractmethod
    def loss(self, model: TrainedModel, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to back-propagate, scalar metrics averaged over micro-batches and ranks). The
        metrics include `loss`, the number reported as the training (and validation) loss."""

    def samples_per_epoch(self) -> int:
        """Training samples in one pass over the data (what the recipe's `epochs` counts)."""
        raise NotImplementedError(f"{type(self).__name__} has no epochs: set max_steps")

    def describe(self) -> str:
        """One line for the run's opening message."""
        return type(self).__name__
