"""How doge runs lm-eval-harness, for `python -m doge.evaluate` and the trainer's in-loop scores alike.

The task names it takes (the local definitions of this folder, checked with every row of their
files before lm-eval loads; other names are lm-eval's, looked up in its index), the task index,
the wrapper that hands lm-eval our model as an instance, and the scoring call. Both users go
through the same functions, so the same tasks, shots and limit give the same prompts and scores.
"""
from __future__ import annotations

import difflib
import json
from collections import Counter
from pathlib import Path

import yaml

from doge.command import one_line
from doge.data.errors import DataError
from doge.eval_tasks import local_data

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("mmlu_local", "arc_easy_local", "arc_challenge_local", "piqa_local", "openbookqa_local",
               "hellaswag_local", "winogrande_local")
LIST_TASKS = "list lm-eval's with `lm-eval ls tasks`"
SHOTS, BATCH_SIZE = 5, 16  # the Doge cards' shots; lm-eval's batch


def metric_value(task_results: dict, metric: str) -> float | None:
    """lm-eval keys metrics as 'NAME,FILTER' (e.g. 'acc,none', 'exact_match,remove_whitespace')."""
    values = [v for key, v in task_results.items() if key.split(",")[0] == metric and isinstance(v, float)]
    return values[0] if values else None


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's task YAML: `!function module.name` kept as its text."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _task_yaml(path: Path) -> dict:
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader) or {}
    if "include" in config:
        config = {**_task_yaml(path.parent / config.pop("include")), **config}
    return config


def local_tasks() -> tuple[dict[str, dict], dict[str, list[str]]]:
    """The task definitions of doge/eval_tasks/ (name -> config, `include` resolved) and its groups
    (name -> subtask names), read without lm-eval."""
    tasks, groups = {}, {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = _task_yaml(path)
        if "group" in config:
            groups[config["group"]] = list(config["task"])
        elif "task" in config:
            tasks[config["task"]] = config
    return tasks, groups


def task_names(spec: str) -> list[str]:
    """--tasks as a list of names: none empty, none repeated."""
    names = [name.strip() for name in spec.split(",")]
    if not any(names):
        raise DataError(f"--tasks {spec!r}: no task named; give comma-separated task names, e.g. "
                        f"{','.join(LOCAL_TASKS[1:3])} (default: {','.join(LOCAL_TASKS)})")
    if not all(names):
        raise DataError(f"--tasks {spec!r}: an empty name (a stray comma); give comma-separated task names")
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataError(f"--tasks {spec!r}: {repeated[0]} named twice; name each task once")
    return names


def looks_local(name: str) -> bool:
    return name.endswith("_local") or "_local_" in name


def unknown_task(name: str, known, hint: str) -> DataError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    maybe = f"did you mean {', '.join(close)}? " if close else ""
    return DataError(f"--tasks {name}: no such task; {maybe}{hint}")


def local_hint() -> str:
    return (f"the local tasks are {', '.join(LOCAL_TASKS)} and mmlu_local_SUBJECT (files in {TASKS_DIR}); "
            f"{LIST_TASKS}")


def _max_multiplicity(rows: list[dict]) -> int:
    return max(Counter(json.dumps(row, sort_keys=True) for row in rows).values())


def check_local_task(name: str, config: dict, root: Path, shots: int) -> None:
    """Read (and so check) every row of the task's data files; DataError when `shots` exceeds what
    its shot rows provide (lm-eval's samplers: from the test split itself, never the scored item,
    so N rows give N - 1 shots; from a separate split, all its rows)."""
    kwargs = config.get("dataset_kwargs") or {}
    test_split, shot_split = config.get("test_split", "test"), config.get("fewshot_split")
    if "subject" in kwargs:
        paths = {split: local_data.mmlu_path(root, kwargs["subject"], split) for split in ("test", "dev")}
        splits = {split: local_data.read_mmlu(path) for split, path in paths.items()}
    else:
        paths = {"test": root / kwargs["file"]}
        splits = {"test": local_data.read_rows(paths["test"], kwargs.get("format", "choice"))}
    if shots == 0:
        return
    if shot_split is None or shot_split == test_split:
        rows = splits[test_split]
        most = len(rows) - _max_multiplicity(rows)
        source = f"{len(rows)} rows in {paths[test_split]}, less the scored one"
    else:
        most = len(splits[shot_split])
        source = f"the {most} rows of {paths[shot_split]}"
    if shots > most:
        raise DataError(f"--num-fewshot {shots}: {name} has {most} shots ({source}); give --num-fewshot {most} "
                        "or less, or a data folder with more rows")


def check_local(names: list[str], root: Path, shots: int) -> list[str]:
    """Check the local names among `names` and their data; the other (lm-eval) names, to check once
    lm-eval is loaded."""
    tasks, groups = local_tasks()
    others, leaves = [], {}
    for name in names:
        if name in groups:
            leaves.update({sub: name for sub in groups[name]})
        elif name in tasks:
            leaves.setdefault(name, name)
        elif looks_local(name):
            raise unknown_task(name, [*tasks, *groups], local_hint())
        else:
            others.append(name)
    both = [sub for sub, group in leaves.items() if sub != group and sub in names]
    if both:
        raise DataError(f"--tasks: {both[0]} is also part of {leaves[both[0]]}; name either the group or its tasks")
    if leaves and not root.is_dir():
        raise DataError(f"{root}: no evaluation data folder; set --data (or DOGE_EVAL_DATA) to the folder of the "
                        "local evaluation files (a small cut ships in tests/assets/eval)")
    for leaf in leaves:
        check_local_task(leaf, tasks[leaf], root, shots)
    return others


def task_manager(hub_names: list[str] = ()):
    """lm-eval's task index with the definitions of doge/eval_tasks. lm-eval's own tasks (a 15-40 s
    index) are indexed only when `hub_names` (names not defined in doge/eval_tasks) need them, and
    those names are checked against it, before any model loads."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(hub_names))
    known = set(manager.all_tasks)
    for name in hub_names:
        if name not in known and not (name.endswith(".yaml") and Path(name).is_file()):
            raise unknown_task(name, manager.all_tasks, LIST_TASKS)
    return manager


def language_model(model, tokenizer, batch_size: int = BATCH_SIZE):
    """lm-eval's `HFLM` around our model instance (lm-eval would otherwise load the stock class).
    Handed an instance, lm-eval acts as one process: it scores every item on whatever rank calls it."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                device=str(model.device))


def run_tasks(lm, tasks: list[str], shots: int, limit: int | None, manager) -> dict:
    """lm-eval's results dict for `lm` on `tasks`: `shots` shots per prompt, the first `limit` items of
    each task; a task's data or shots that lm-eval cannot use are a DataError."""
    import lm_eval

    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit,
                                       task_manager=manager, log_samples=False)
    except (ValueError, AssertionError) as err:
        if isinstance(err, DataError):
            raise
        if "sample larger than population" in str(err).lower() or "fewshot samples" in str(err).lower():
            raise DataError(f"--num-fewshot {shots}: more shots than a task's shot split holds ({one_line(err)}); "
                            "give a smaller --num-fewshot") from None
        raise
    except OSError as err:  # a hub task's data: no network, no such dataset
        raise DataError(f"--tasks {','.join(tasks)}: a task's data could not be loaded ({one_line(err)}); "
                        "lm-eval's hub tasks need the Hugging Face hub (or its cache); local ones do not") from None
