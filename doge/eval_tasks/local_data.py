"""Datasets for the local task definitions: the JSONL/CSV files of an evaluation data folder.

The folder is `DOGE_EVAL_DATA` (set by `python -m doge.evaluate --data`), else `shared/data/eval`
beside the repository. File formats: ARC, PIQA and OpenBookQA as `{query, choices, gold}`,
WinoGrande as `{context_options, continuation, gold}` (partial scoring; the task's
`dataset_kwargs` say `format: partial`), MMLU as headerless CSV `question,A,B,C,D,answer` per
subject with the five shots in `dev/`, HellaSwag as six text lines per item (`label: context`, the
gold index, four endings; `.bz2` read as is, `format: hellaswag`). lm-eval calls `load` through
each task's `custom_dataset`, with the task's `dataset_kwargs`.

Every row is checked as it is read (`read_jsonl`, `read_hellaswag`, `read_mmlu`, which `doge.evaluate` also calls
before it loads anything): a row that is not a JSON object, lacks a field, or whose answer is no
index into its choices (no letter A-D for MMLU) is a `DataError` naming the file, the line and the
field, never a row scored without an answer. Blank lines are skipped.
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
import re
from pathlib import Path

from doge.data.errors import DataError

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
# JSONL row formats: the fields each row must have (the answer last)
FORMATS = {"choice": ("query", "choices", "gold"), "partial": ("context_options", "continuation", "gold")}
TASK_FORMATS = (*FORMATS, "hellaswag")  # every `format` a task's dataset_kwargs may name
MMLU_COLUMNS = "question,A,B,C,D,answer"
FIX = "set --data (or DOGE_EVAL_DATA) to the eval folder"


def data_dir() -> Path:
    return Path(os.environ.get("DOGE_EVAL_DATA") or DEFAULT_DATA)


def mmlu_path(root: Path, subject: str, split: str) -> Path:
    return root / "mmlu" / split / f"{subject}_{split}.csv"


def load(file: str | None = None, subject: str | None = None, format: str = "choice", **_metadata):
    """A `test` split from one task file, or MMLU's `test` and `dev` splits for one subject."""
    import datasets

    root = data_dir()
    if subject is not None:
        return datasets.DatasetDict({split: datasets.Dataset.from_list(read_mmlu(mmlu_path(root, subject, split)))
                                     for split in ("test", "dev")})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_rows(root / file, format))})


def read_rows(path: Path, format: str = "choice") -> list[dict]:
    """The checked rows of a task file in `format` (one of TASK_FORMATS)."""
    return read_hellaswag(path) if format == "hellaswag" else read_jsonl(path, format)


def _lines(path: Path, what: str) -> list[str]:
    """The file's lines (a .bz2 file decompressed); DataError for a missing file or a line that is
    not UTF-8."""
    if not path.is_file():
        raise DataError(f"{path}: no {what} file; {FIX}")
    lines = []
    with (bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")) as f:
        for number, raw in enumerate(f, 1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {number}: not UTF-8 text ({err.reason}); "
                                "save the file as UTF-8") from None
    return lines


def read_jsonl(path: Path, format: str = "choice") -> list[dict]:
    """The rows of a JSONL task file, each checked to have FORMATS[format]'s fields, the choices a
    list of at least two texts and `gold` an index into them."""
    fields = FORMATS[format]
    choices_field, text_field = fields[:2] if format == "partial" else fields[1::-1]
    rows = []
    for number, line in enumerate(_lines(Path(path), "evaluation"), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg} at column {err.colno}); fix or delete the line") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: a JSON object with {', '.join(fields)} expected, got "
                            f"{type(row).__name__}; fix or delete the line")
        for field in fields:
            if field not in row or row[field] is None:
                why = " (the answer; a row without one cannot be scored)" if field == "gold" else ""
                raise DataError(f"{where}: no '{field}' field{why}; every row needs {', '.join(fields)}: "
                                "add it or delete the row")
        options = row[choices_field]
        if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) for o in options)):
            raise DataError(f"{where}: '{choices_field}' must be a list of at least two texts; fix the row")
        if not isinstance(row[text_field], str):
            raise DataError(f"{where}: '{text_field}' must be a text; fix the row")
        gold = row["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
            raise DataError(f"{where}: 'gold' (the answer) is {gold!r}, not an index 0..{len(options) - 1} "
                            f"into its {len(options)} '{choices_field}'; fix the row")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows; {FIX}, or fill the file")
    return rows


def read_mmlu(path: Path) -> list[dict]:
    """One MMLU subject split: headerless CSV rows `question,A,B,C,D,answer`, the answer a letter."""
    rows = []
    reader = csv.reader(io.StringIO("".join(_lines(Path(path), "MMLU")), newline=""))
    number = 1  # the line a record starts on (a quoted field may span lines)
    while True:
        where = f"{path} line {number}"
        try:
            r = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{where}: not CSV ({err}); fix the row") from None
        number = reader.line_num + 1
        if not r:
            continue
        if len(r) != 6:
            missing = " (no answer column)" if len(r) == 5 else ""
            raise DataError(f"{where}: {len(r)} fields{missing}, expected 6 ({MMLU_COLUMNS}); fix the row")
        answer = r[5].strip()
        if answer not in ("A", "B", "C", "D"):
            raise DataError(f"{where}: answer {r[5]!r} is not one of A, B, C, D; fix the row")
        rows.append(dict(question=r[0], choices=r[1:5], answer="ABCD".index(answer)))
    if not rows:
        raise DataError(f"{path}: no rows; {FIX}, or fill the file")
    return rows


def hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag `preprocess`: strip, ` [title]` to `. `, drop `[...]` markers, single spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag_query(line: str) -> str:
    """lm-eval's HellaSwag prompt, `activity_label: ctx_a + " " + ctx_b.capitalize()`, from the file's
    joined `label: context` line. The file does not mark where ctx_a ends: ctx_b is taken as the
    text after the context's last sentence end when it starts in lower case (HellaSwag's ctx_b
    is the unfinished start of the next sentence, e.g. "he" or "the lady"), else it is empty."""
    label, _, context = line.partition(": ")
    cut = max(context.rfind(end) for end in (". ", "? ", "! "))
    head, tail = (context[: cut + 2], context[cut + 2:]) if cut >= 0 else ("", context)
    if tail[:1].islower():
        context = head + tail.capitalize()
    return hellaswag_text(f"{label}: {context}")


def read_hellaswag(path: Path) -> list[dict]:
    """HellaSwag items as `{query, choices, gold}`: six lines each (`label: context`, the gold index
    0-3, the four endings), the prompt and endings preprocessed as lm-eval's `hellaswag` task does."""
    lines = [line.rstrip("\n") for line in _lines(Path(path), "HellaSwag")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines, not a multiple of 6 (`label: context`, the gold index, "
                        "four endings per item); restore the file")
    rows = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start: start + 6]
        if ": " not in context:
            raise DataError(f"{path} line {start + 1}: {context[:60]!r} is not `label: context`; restore the file")
        if gold.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path} line {start + 2}: the gold index (the answer) is {gold!r}, not 0-3; "
                            "a row without an answer cannot be scored: restore the file")
        rows.append(dict(query=hellaswag_query(context), choices=[hellaswag_text(e) for e in endings],
                         gold=int(gold)))
    return rows
