"""Benchmark an export with lm-eval-harness: `python -m doge.evaluate --model EXPORT [--tasks ...]`.

The export is loaded as our `DogeForCausalLM` and handed to lm-eval's `HFLM` as an instance (lm-eval
would otherwise load the stock transformers class, which routes CDMoE wrongly). Tasks are lm-eval
names: the local definitions in `doge/eval_tasks/` (`mmlu_local`, `arc_easy_local`,
`arc_challenge_local`, `piqa_local`, `openbookqa_local`, `hellaswag_local`, `winogrande_local`: the
files of --data) or, online, lm-eval's own (`mmlu`, `triviaqa`, `arc_easy`, `arc_challenge`, `piqa`,
`hellaswag`, `openbookqa`, `winogrande`). Writes OUTPUT/results.json (lm-eval's results and the table) and
OUTPUT/results.md: one row in the column order of the Doge model cards, each column with the metric
they report (acc_norm for ARC, PIQA, HellaSwag, OBQA; acc for MMLU and WinoGrande; exact match for
TriviaQA), in percent.

Bad input is one `error: ...` line (exit 2) naming the flag or file and the fix, and nothing is
written. Checked before lm-eval or the model loads (a second or two): the counts, an empty, repeated
or unknown local task name, an export folder without config.json, weights or tokenizer, an --output
that is a file or not writable, every row of the local tasks' files (a line that is not JSON/CSV, a
missing field, an answer that is no index into the choices: the error names file, line and field;
no row is scored without an answer), and --num-fewshot against the shots each local task has
(MMLU: its dev/ rows; the others: the other rows of the test file). lm-eval's own task names are
checked once lm-eval has indexed its tasks (15-20 s), still before the model loads.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import yaml

from doge.command import OneLineParser, check_export, one_line
from doge.data.errors import DataError
from doge.eval_tasks import local_data

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
LOCAL_TASKS = ("mmlu_local", "arc_easy_local", "arc_challenge_local", "piqa_local", "openbookqa_local",
               "hellaswag_local", "winogrande_local")
# (column, metric, task names that fill it: local first, then lm-eval's hub task)
COLUMNS = (("MMLU", "acc", ("mmlu_local", "mmlu")), ("TriviaQA", "exact_match", ("triviaqa",)),
           ("ARC-E", "acc_norm", ("arc_easy_local", "arc_easy")),
           ("ARC-C", "acc_norm", ("arc_challenge_local", "arc_challenge")),
           ("PIQA", "acc_norm", ("piqa_local", "piqa")), ("HellaSwag", "acc_norm", ("hellaswag_local", "hellaswag")),
           ("OBQA", "acc_norm", ("openbookqa_local", "openbookqa")),
           ("Winogrande", "acc", ("winogrande_local", "winogrande")))
LIST_TASKS = "list lm-eval's with `lm-eval ls tasks`"


def parse_args(argv=None):
    p = OneLineParser(prog="python -m doge.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="EXPORT", help="HF export folder (model + tokenizer)")
    p.add_argument("--tasks", metavar="TASK,...", default=",".join(LOCAL_TASKS),
                   help="comma-separated lm-eval task names (default: the seven local tasks)")
    p.add_argument("--num-fewshot", type=int, default=5, metavar="K",
                   help="shots per prompt (default 5, as the Doge cards; at most what each task's shot rows hold)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="score only the first N items of each task (MMLU: of each subject)")
    p.add_argument("--output", metavar="DIR", help="results folder (default: EXPORT/../eval)")
    p.add_argument("--data", metavar="DIR", help="folder of the local evaluation files (default: $DOGE_EVAL_DATA, else "
                   "shared/data/eval beside the checkout)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="lm-eval batch size (default 16)")
    return p.parse_args(argv)


def metric_value(task_results: dict, metric: str) -> float | None:
    """lm-eval keys metrics as 'NAME,FILTER' (e.g. 'acc,none', 'exact_match,remove_whitespace')."""
    values = [v for key, v in task_results.items() if key.split(",")[0] == metric and isinstance(v, float)]
    return values[0] if values else None


def table_row(results: dict) -> dict[str, tuple[str, float] | None]:
    """Column -> (task, value) for each column a task of `results` fills, else None."""
    row = {}
    for column, metric, tasks in COLUMNS:
        found = [(task, metric_value(results[task], metric)) for task in tasks if task in results]
        row[column] = next(((task, value) for task, value in found if value is not None), None)
    return row


def markdown(row: dict, model: str, shots: int, limit: int | None) -> str:
    head = " | ".join(f"{column} ({metric})" for column, metric, _ in COLUMNS)
    cells = " | ".join("-" if row[column] is None else f"{100 * row[column][1]:.1f}" for column, _, _ in COLUMNS)
    scope = f"{shots}-shot" + (f", first {limit} items per task" if limit else "")
    return (f"| model | {head} |\n|---|{'---|' * len(COLUMNS)}\n| {Path(model).name} | {cells} |\n\n"
            f"{model}, {scope}; percent; '-' = task not run.\n")


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


def check_output(out: Path) -> None:
    """OUT must be (or become) a writable folder whose results.json/.md can be replaced; nothing is created."""
    fix = "give --output a folder path you can write to (it is created if missing)"
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {out}: a file, not a folder; {fix}")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"--output {out}: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"--output {out}: {existing} is not writable; {fix}")
    for name in ("results.json", "results.md"):
        if (out / name).exists() and not (out / name).is_file():
            raise DataError(f"--output {out}: {out / name} is not a file; move it away or give another --output")


def check(args) -> tuple[list[str], list[str], Path]:
    """Everything checkable before lm-eval and the model load: (task names, names left for lm-eval,
    output folder); DataError on the first problem."""
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            raise DataError(f"{flag} {value}: give a number of at least {least}")
    names = task_names(args.tasks)
    if args.data is not None and not Path(args.data).is_dir():
        what = "a file, not a folder" if Path(args.data).exists() else "no such folder"
        raise DataError(f"--data {args.data}: {what}; give the folder of the local evaluation files "
                        "(a small cut ships in tests/assets/eval)")
    check_export(args.model)
    out = Path(args.output or Path(args.model).resolve().parent / "eval")
    check_output(out)
    others = check_local(names, local_data.data_dir(), args.num_fewshot)
    return names, others, out


def evaluate(model_dir: str, tasks: list[str], shots: int, limit: int | None, batch_size: int,
             hub_names: list[str] = ()) -> dict:
    """lm-eval's results dict for our model instance on `tasks`; `hub_names` (names not defined in
    doge/eval_tasks) are checked against lm-eval's index first, before the model loads."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR))
    known = set(manager.all_tasks)
    for name in hub_names:
        if name not in known and not (name.endswith(".yaml") and Path(name).is_file()):
            raise unknown_task(name, manager.all_tasks, LIST_TASKS)
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from doge import DogeForCausalLM

    try:
        model = DogeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # a truncated or foreign weights file: safetensors, torch and transformers errors
        raise DataError(f"--model {model_dir}: cannot load ({one_line(err)}); export the checkpoint again") from None
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size, device="cpu")
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


def write_results(out: Path, table: str, record: dict) -> None:
    """OUT/results.md and OUT/results.json, each replaced in one step; on failure the JSON goes to
    stdout (the table is printed already) so no score is lost."""
    from doge import atomic

    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / "results.md", table)
        atomic.write_text(out / "results.json", json.dumps(record, indent=1, default=str))
    except OSError as err:
        print(json.dumps(record, indent=1, default=str))
        raise DataError(f"--output {out}: results not written ({one_line(err)}); the table and the JSON "
                        "above hold them; free space or choose another --output") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data:
        os.environ["DOGE_EVAL_DATA"] = str(Path(args.data).resolve())
    try:
        names, hub_names, out = check(args)
        results = evaluate(args.model, names, args.num_fewshot, args.limit, args.batch_size, hub_names)
        row = table_row(results["results"])
        table = markdown(row, args.model, args.num_fewshot, args.limit)
        print(table, end="")
        record = dict(model=str(args.model), num_fewshot=args.num_fewshot, limit=args.limit,
                      table={c: None if v is None else dict(task=v[0], value=v[1]) for c, v in row.items()},
                      results=results["results"], n_samples=results.get("n-samples"),
                      versions=results.get("versions"))
        write_results(out, table, record)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written to {out}/results.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
