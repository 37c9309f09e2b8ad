"""Datasets for the local task definitions: the JSONL/CSV files of an evaluation data folder.

The folder is `DOGE_EVAL_DATA` (set by `python -m doge.evaluate --data`), else `shared/data/eval`
beside the repository. File formats: ARC, PIQA and OpenBookQA as `{query, choices, gold}`,
WinoGrande as `{context_options, continuation, gold}` (partial scoring), MMLU as headerless CSV
`question,A,B,C,D,answer` per subject with the five shots in `dev/`. lm-eval calls `load` through
each task's `custom_dataset`, with the task's `dataset_kwargs`.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


def data_dir() -> Path:
    return Path(os.environ.get("DOGE_EVAL_DATA") or DEFAULT_DATA)


def load(file: str | None = None, subject: str | None = None, **_metadata) -> datasets.DatasetDict:
    """A `test` split from one JSONL file, or MMLU's `test` and `dev` splits for one subject."""
    root = data_dir()
    if subject is not None:
        return datasets.DatasetDict({split: _mmlu(root / "mmlu" / split / f"{subject}_{split}.csv")
                                     for split in ("test", "dev")})
    path = root / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation file; set --data (or DOGE_EVAL_DATA) to the eval folder")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _mmlu(path: Path) -> datasets.Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no MMLU file; set --data (or DOGE_EVAL_DATA) to the eval folder")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [dict(question=r[0], choices=r[1:5], answer="ABCD".index(r[5].strip())) for r in csv.reader(f)]
    return datasets.Dataset.from_list(rows)
