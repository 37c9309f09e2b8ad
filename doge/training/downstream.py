"""Benchmark scores during training: lm-eval on the weights being trained, every --downstream-interval steps.

The scoring is `python -m doge.evaluate`'s own (`doge.eval_tasks.harness`: its checks, task index,
lm-eval wrapper, `simple_evaluate` call and batch size), handed the engine's module instead of an
export: the same prompts and metrics on the first --downstream-limit items of each task, so a
step's scores equal `doge.evaluate` on the export of that step's checkpoint (fp32 runs).

lm-eval, handed a model instance, acts as one process: every rank scores every item, in the same
batches. That is what the model's collectives need: ZeRO-3 gathers each layer's parameters from
all ranks, and expert parallelism exchanges tokens within the expert group, whose ranks must pass
the same number of tokens. lm-eval reports on local rank 0 only; rank 0 logs.

Training goes on as if nothing ran: lm-eval seeds python, numpy and torch (for its few-shot
samples), so their streams are put back afterwards; the module returns to train mode; compiled
layers run eager (a scoring batch's shapes and no-grad would otherwise compile anew); the data
order is a function of the samples consumed and is not touched. The checkpoint holds nothing new.
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from doge.data.errors import DataError
from doge.eval_tasks.harness import check_local, language_model, metric_value, run_tasks, task_manager, task_names
from doge.eval_tasks.local_data import data_dir
from doge.training import checkpoint as ckpt
from doge.training.recipe import ConfigError, Recipe

# doge.evaluate's flags in its messages -> how a training run sets the same thing
RECIPE_TERMS = {"--data (or DOGE_EVAL_DATA)": "DOGE_EVAL_DATA", "--tasks": "--downstream-tasks",
                "--num-fewshot": "--downstream-shots"}


@contextlib.contextmanager
def in_recipe_terms():
    """doge.evaluate's DataError as a ConfigError that names the recipe's flags instead of its own."""
    try:
        yield
    except DataError as err:
        message = str(err)
        for theirs, ours in RECIPE_TERMS.items():
            message = message.replace(theirs, ours)
        raise ConfigError(message) from None


def hub_names(tasks: str, shots: int) -> list[str]:
    """Check the task names and every row of the local tasks' files (doge.evaluate's checks); the
    names that are lm-eval's own, to look up in its index."""
    return check_local(task_names(tasks), data_dir(), shots)


def check(recipe: Recipe) -> None:
    """Preflight: nothing when off; else the task names and their files, and lm-eval's own names
    against its index (15-40 s, only when such names are given)."""
    if recipe.downstream_interval:
        with in_recipe_terms():
            task_manager(hub_names(recipe.downstream_tasks, recipe.downstream_shots))


@functools.lru_cache(maxsize=1)
def setup(module: torch.nn.Module, tokenizer_dir: str, tasks: str, shots: int):
    """(task names, lm-eval's task index, its model wrapper around `module`), made once per process:
    the module is the engine's for the whole run, and lm-eval's own index takes 15-40 s to build."""
    from transformers import AutoTokenizer

    manager = task_manager(hub_names(tasks, shots))
    return task_names(tasks), manager, language_model(module, AutoTokenizer.from_pretrained(tokenizer_dir))


@contextlib.contextmanager
def aside(engine):
    """Eval mode, no compiled graphs, and every RNG stream as it was before, for a detour off training."""
    rng = ckpt.rng_state()
    engine.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        engine.train()
        ckpt.set_rng_state(rng)


def flat_scores(results: dict, names: list[str]) -> dict[str, float]:
    """`downstream/TASK/METRIC` for each metric lm-eval reports for the named tasks (a group's
    aggregate, not its subtasks; no standard errors)."""
    out = {}
    for name in names:
        metrics = {key.split(",")[0] for key in results[name] if "," in key and "_stderr" not in key}
        out.update({f"downstream/{name}/{metric}": metric_value(results[name], metric) for metric in sorted(metrics)})
    return {key: value for key, value in out.items() if value is not None}


def score(engine, tokenizer_dir, recipe: Recipe) -> dict[str, float]:
    """The scores of the engine's current weights on --downstream-tasks, and the seconds they took as
    `downstream/seconds` (empty on ranks other than local rank 0). Every rank must call it at the same step."""
    started = time.perf_counter()
    with in_recipe_terms(), aside(engine):  # the setup too: no part of lm-eval runs outside the detour
        names, manager, lm = setup(engine.module, str(tokenizer_dir), recipe.downstream_tasks, recipe.downstream_shots)
        results = run_tasks(lm, names, recipe.downstream_shots, recipe.downstream_limit, manager)
    if results is None:  # lm-eval reports on local rank 0 only; this rank ran the same forward passes
        return {}
    return {**flat_scores(results["results"], names), "downstream/seconds": time.perf_counter() - started}
