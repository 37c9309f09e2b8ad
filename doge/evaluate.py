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
import json
import os
import sys
from pathlib import Path

from doge.command import OneLineParser, check_export, one_line
from doge.data.errors import DataError
from doge.eval_tasks import local_data
from doge.eval_tasks.harness import (
    BATCH_SIZE,
    LOCAL_TASKS,
    SHOTS,
    check_local,
    language_model,
    metric_value,
    run_tasks,
    task_manager,
    task_names,
)

# (column, metric, task names that fill it: local first, then lm-eval's hub task)
COLUMNS = (("MMLU", "acc", ("mmlu_local", "mmlu")), ("TriviaQA", "exact_match", ("triviaqa",)),
           ("ARC-E", "acc_norm", ("arc_easy_local", "arc_easy")),
           ("ARC-C", "acc_norm", ("arc_challenge_local", "arc_challenge")),
           ("PIQA", "acc_norm", ("piqa_local", "piqa")), ("HellaSwag", "acc_norm", ("hellaswag_local", "hellaswag")),
           ("OBQA", "acc_norm", ("openbookqa_local", "openbookqa")),
           ("Winogrande", "acc", ("winogrande_local", "winogrande")))


def parse_args(argv=None):
    p = OneLineParser(prog="python -m doge.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="EXPORT", help="HF export folder (model + tokenizer)")
    p.add_argument("--tasks", metavar="TASK,...", default=",".join(LOCAL_TASKS),
                   help="comma-separated lm-eval task names (default: the seven local tasks)")
    p.add_argument("--num-fewshot", type=int, default=SHOTS, metavar="K",
                   help=f"shots per prompt (default {SHOTS}, as the Doge cards; at most what each task's shot rows "
                        "hold)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="score only the first N items of each task (MMLU: of each subject)")
    p.add_argument("--output", metavar="DIR", help="results folder (default: EXPORT/../eval)")
    p.add_argument("--data", metavar="DIR", help="folder of the local evaluation files (default: $DOGE_EVAL_DATA, else "
                   "shared/data/eval beside the checkout)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, metavar="B",
                   help=f"lm-eval batch size (default {BATCH_SIZE})")
    return p.parse_args(argv)


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
    """lm-eval's results dict for the export `model_dir` on `tasks` (`hub_names` checked first)."""
    manager = task_manager(hub_names)
    import torch
    from transformers import AutoTokenizer

    from doge import DogeForCausalLM

    try:
        model = DogeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # a truncated or foreign weights file: safetensors, torch and transformers errors
        raise DataError(f"--model {model_dir}: cannot load ({one_line(err)}); export the checkpoint again") from None
    return run_tasks(language_model(model, tok, batch_size), tasks, shots, limit, manager)


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
