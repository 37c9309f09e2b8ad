"""Benchmark an export with lm-eval-harness: `python -m doge.evaluate --model EXPORT [--tasks ...]`.

The export is loaded as our `DogeForCausalLM` and handed to lm-eval's `HFLM` as an instance (lm-eval
would otherwise load the stock transformers class, which routes CDMoE wrongly). Tasks are lm-eval
names: the local definitions in `doge/eval_tasks/` (`mmlu_local`, `arc_easy_local`,
`arc_challenge_local`, `piqa_local`, `openbookqa_local`, `winogrande_local`: the files of --data)
or, online, lm-eval's own (`mmlu`, `triviaqa`, `arc_easy`, `arc_challenge`, `piqa`, `hellaswag`,
`openbookqa`, `winogrande`). Writes OUTPUT/results.json (lm-eval's results and the table) and
OUTPUT/results.md: one row in the column order of the Doge model cards, each column with the metric
they report (acc_norm for ARC, PIQA, HellaSwag, OBQA; acc for MMLU and WinoGrande; exact match for
TriviaQA), in percent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
LOCAL_TASKS = ("mmlu_local", "arc_easy_local", "arc_challenge_local", "piqa_local", "openbookqa_local",
               "winogrande_local")
# (column, metric, task names that fill it: local first, then lm-eval's hub task)
COLUMNS = (("MMLU", "acc", ("mmlu_local", "mmlu")), ("TriviaQA", "exact_match", ("triviaqa",)),
           ("ARC-E", "acc_norm", ("arc_easy_local", "arc_easy")),
           ("ARC-C", "acc_norm", ("arc_challenge_local", "arc_challenge")),
           ("PIQA", "acc_norm", ("piqa_local", "piqa")), ("HellaSwag", "acc_norm", ("hellaswag",)),
           ("OBQA", "acc_norm", ("openbookqa_local", "openbookqa")),
           ("Winogrande", "acc", ("winogrande_local", "winogrande")))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="EXPORT", help="HF export folder (model + tokenizer)")
    p.add_argument("--tasks", metavar="TASK,...", default=",".join(LOCAL_TASKS),
                   help="comma-separated lm-eval task names (default: the six local tasks)")
    p.add_argument("--num-fewshot", type=int, default=5, metavar="K",
                   help="shots per prompt (default 5, as the Doge cards)")
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


def evaluate(model_dir: str, tasks: list[str], shots: int, limit: int | None, batch_size: int) -> dict:
    """lm-eval's results dict for our model instance on `tasks`."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from doge import DogeForCausalLM

    model = DogeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), backend="causal",
              batch_size=batch_size, device="cpu")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.data:
        os.environ["DOGE_EVAL_DATA"] = str(Path(args.data).resolve())
    if not (Path(args.model) / "config.json").is_file():
        print(f"error: --model {args.model}: not an export folder (no config.json)", file=sys.stderr)
        return 2
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < least:
            print(f"error: {flag} {value}: give a number of at least {least}", file=sys.stderr)
            return 2
    out = Path(args.output or Path(args.model).resolve().parent / "eval")
    try:
        results = evaluate(args.model, args.tasks.split(","), args.num_fewshot, args.limit, args.batch_size)
    except FileNotFoundError as err:  # a local task's data file (the message names it and the fix)
        print(f"error: {err}", file=sys.stderr)
        return 2
    row = table_row(results["results"])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(row, args.model, args.num_fewshot, args.limit)
    (out / "results.md").write_text(table)
    record = dict(model=str(args.model), num_fewshot=args.num_fewshot, limit=args.limit,
                  table={c: None if v is None else dict(task=v[0], value=v[1]) for c, v in row.items()},
                  results=results["results"], n_samples=results.get("n-samples"), versions=results.get("versions"))
    (out / "results.json").write_text(json.dumps(record, indent=1, default=str))
    print(table + f"written to {out}/results.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
