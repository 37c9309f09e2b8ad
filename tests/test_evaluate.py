"""`python -m doge.evaluate`: lm-eval on our model equals log-likelihood scoring done here by hand.

The reference builds each prompt from the raw files itself (lm-eval's zero-shot formats: ARC and
PIQA "Question: ...\\nAnswer:", OBQA the bare question, WinoGrande each context option before the
shared continuation, HellaSwag "label: context" with the unfinished last sentence capitalised and
lm-eval's marker clean-up, MMLU the subject line, question, lettered options and "Answer:"), scores
every choice as the sum of its continuation tokens' log-probs given the context (the
continuation's tokens are those of context + " " + choice after the context's), and takes the
argmax; acc_norm divides by the choice's length in characters, as lm-eval's acc_norm does
(its acc_bytes divides by UTF-8 bytes; ARC-Challenge has non-ASCII choices, so they differ).
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import functools
import json
import re
import sys

import pytest
import torch
import train_harness as h
from conftest import ASSETS

from doge.evaluate import COLUMNS, LOCAL_TASKS, markdown, table_row

EVAL = ASSETS / "eval"  # the local tasks' files: 25 items per JSONL task, 57 MMLU subjects
LIMIT = 20
MMLU_ITEMS = 3  # test rows per MMLU subject in EVAL (its dev/ holds each subject's 5 shots)


@functools.lru_cache(maxsize=None)
def tiny_export() -> h.Path:
    """A seeded random doge-tiny with the harness's 1024-token tokenizer, init wide enough (0.2)
    that choices' scores are far apart (no near-ties for batching noise to flip)."""
    from transformers import AutoTokenizer

    from doge import DogeConfig, DogeForCausalLM

    tok, out = AutoTokenizer.from_pretrained(h.tokenizer()), h.BASE / "eval-tiny"
    torch.manual_seed(0)
    DogeForCausalLM(DogeConfig.from_preset("doge-tiny", vocab_size=1024, initializer_range=0.2)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def mmlu_subjects() -> list[str]:
    """Every subject with a test file in the local MMLU folder."""
    return sorted(p.name[: -len("_test.csv")] for p in (EVAL / "mmlu" / "test").glob("*_test.csv"))


def jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (EVAL / name).read_text().splitlines()[:LIMIT]]


def items() -> dict[str, list[tuple[list[tuple[str, str]], list[str], int]]]:
    """Task -> [(context/continuation pairs, choice strings, gold)] for the first LIMIT items."""
    def choices_after(context, rows):
        return [([(context(r), " " + c) for c in r["choices"]], r["choices"], r["gold"]) for r in rows]

    tasks = {name: choices_after(lambda r: r["query"] + "\nAnswer:", jsonl(file)) for name, file in
             (("arc_easy_local", "arc_easy.jsonl"), ("arc_challenge_local", "arc_challenge.jsonl"),
              ("piqa_local", "piqa.jsonl"))}
    tasks["openbookqa_local"] = choices_after(lambda r: r["query"], jsonl("openbook_qa.jsonl"))
    tasks["winogrande_local"] = [([(c, " " + r["continuation"]) for c in r["context_options"]], r["context_options"],
                                  r["gold"]) for r in jsonl("winogrande.jsonl")]
    tasks["hellaswag_local"] = [([(query, " " + e) for e in endings], endings, gold)
                                for query, endings, gold in hellaswag_items()[:LIMIT]]
    tasks.update({f"mmlu_local_{s}": mmlu_items(EVAL / "mmlu" / "test" / f"{s}_test.csv") for s in mmlu_subjects()})
    return tasks


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag `preprocess`."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def hellaswag_items() -> list[tuple[str, list[str], int]]:
    """(query, endings, gold) per six lines of the file. lm-eval's query is `label: ctx_a ctx_b`
    with ctx_b capitalised; ctx_b is what follows the context's last sentence end, when it starts
    in lower case."""
    lines = bz2.open(EVAL / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().splitlines()
    out = []
    for i in range(0, len(lines) - 5, 6):
        label, context = lines[i].split(": ", 1)
        done, rest = re.match(r"(.*[.?!] )?(.*)$", context).groups()
        if rest[:1].islower():
            context = (done or "") + rest[0].upper() + rest[1:].lower()
        out.append((hellaswag_clean(f"{label}: {context}"), [hellaswag_clean(e) for e in lines[i + 2: i + 6]],
                    int(lines[i + 1])))
    return out


def test_hellaswag_prompts_are_lm_evals():
    """The first items as lm-eval's `hellaswag` task builds them from the hub data set's fields
    (activity_label, ctx_a, ctx_b, endings, label), and the task's rows equal the reference's."""
    from doge.eval_tasks.local_data import read_hellaswag

    rows = read_hellaswag(EVAL / "hellaswag_val_full.txt.bz2")
    assert [r["query"] for r in rows[:3]] == [
        "Roof shingle removal: A man is sitting on a roof. He",
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
        "Canoeing: Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
        "water, with other individuals visible in the background. The child and a different man"]
    assert [r["gold"] for r in rows[:3]] == [3, 3, 2]
    assert [(r["query"], r["choices"], r["gold"]) for r in rows] == hellaswag_items()
    assert len(rows) == 25


def mmlu_items(path):
    subject = path.name[: -len("_test.csv")].replace("_", " ")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[:LIMIT]
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return [([(head + r[0].strip() + "".join(f"\n{x}. {c}" for x, c in zip("ABCD", r[1:5])) + "\nAnswer:", " " + x)
              for x in "ABCD"], list("ABCD"), "ABCD".index(r[5].strip())) for r in rows]


def log_likelihoods(model, tok, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Summed continuation log-probs of each (context, continuation). A sequence's last token is
    never an input, so each distinct sequence-minus-its-last-token is one row (MMLU's four
    one-token answers share a row), right-padded into one batch (a causal model's earlier
    positions never see the padding)."""
    wholes = [tok(c + x)["input_ids"] for c, x in pairs]
    starts = [len(tok(c)["input_ids"]) for c, _ in pairs]
    inputs = sorted({tuple(w[:-1]) for w in wholes})
    width = max(map(len, inputs))
    logits = model(torch.tensor([[*r] + [0] * (width - len(r)) for r in inputs])).logits.float().log_softmax(-1)
    rows = [inputs.index(tuple(w[:-1])) for w in wholes]
    return torch.tensor([sum(float(logits[row, i - 1, w[i]]) for i in range(start, len(w)))
                         for row, w, start in zip(rows, wholes, starts)])


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as the harness gives its subprocesses (OMP_NUM_THREADS=1): on a shared,
    loaded 2-core CPU two OpenMP threads spin-wait on each other and a forward takes ~15x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
@one_thread()
def reference_scores(export) -> dict[str, dict[str, float]]:
    from transformers import AutoTokenizer

    from doge import DogeForCausalLM

    model, tok = DogeForCausalLM.from_pretrained(export).eval(), AutoTokenizer.from_pretrained(export)
    out = {}
    for task, rows in items().items():
        acc = acc_norm = 0
        for pairs, choices, gold in rows:
            lls = log_likelihoods(model, tok, pairs)
            acc += int(lls.argmax()) == gold
            acc_norm += int((lls / torch.tensor([float(len(c)) for c in choices])).argmax()) == gold
        out[task] = {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "items": len(rows)}
    return out


@pytest.mark.slow
def test_local_tasks_equal_log_likelihood_scoring_by_hand():
    """The default task set as `doge.evaluate` runs it, MMLU as lm-eval reports it: the `mmlu_local`
    group over every subject of the local files, 20 items each (--limit counts per subject; EVAL holds
    3 per MMLU subject, all scored), its size-weighted acc and the table's MMLU cell, plus each
    subject's own acc. The test covers every subject rather than the aggregate of a sample."""
    export, out = tiny_export(), h.BASE / "eval-tiny-results"
    h.run([sys.executable, "-m", "doge.evaluate", "--model", str(export), "--num-fewshot", "0", "--limit", str(LIMIT),
           "--batch-size", "32", "--output", str(out), "--data", str(EVAL)])
    record = json.loads((out / "results.json").read_text())
    got, expected = record["results"], reference_scores(export)
    assert {t for t in got if t.startswith("mmlu_local_")} == {t for t in expected if t.startswith("mmlu_local_")}
    assert len(expected) == len(LOCAL_TASKS) - 1 + len(mmlu_subjects()) and len(mmlu_subjects()) == 57
    assert all(scores["items"] == (MMLU_ITEMS if task.startswith("mmlu_local_") else LIMIT)
               for task, scores in expected.items())
    for task, scores in expected.items():
        for metric in ("acc", "acc_norm") if task.split("_local")[0] in ("arc_easy", "arc_challenge", "piqa",
                                                                          "openbookqa", "hellaswag") else ("acc",):
            assert got[task][f"{metric},none"] == pytest.approx(scores[metric], abs=1e-9), (task, metric)
    subjects = [scores for task, scores in expected.items() if task.startswith("mmlu_local_")]
    mmlu = sum(s["acc"] * s["items"] for s in subjects) / sum(s["items"] for s in subjects)
    assert got["mmlu_local"]["acc,none"] == pytest.approx(mmlu, abs=1e-9)
    assert record["table"]["MMLU"] == {"task": "mmlu_local", "value": pytest.approx(mmlu, abs=1e-9)}


def checked_table(out: h.Path) -> dict[str, str]:
    """OUT/results.md's row as column -> cell, checked against OUT/results.json: the header in the
    Doge cards' order, every local task filling its column with that column's metric as lm-eval
    reported it (in percent in the row), '-' where only a hub task could fill the column."""
    record = json.loads((out / "results.json").read_text())
    head, _, row = (out / "results.md").read_text().splitlines()[:3]
    assert head == "| model | " + " | ".join(f"{column} ({metric})" for column, metric, _ in COLUMNS) + " |"
    cells = dict(zip([column for column, _, _ in COLUMNS], [c.strip() for c in row.strip("|").split("|")][1:]))
    for column, metric, tasks in COLUMNS:
        local = [task for task in tasks if task in LOCAL_TASKS]
        entry = record["table"][column]
        if not local:
            assert entry is None and cells[column] == "-", (column, row)
            continue
        assert entry["task"] == local[0] and entry["value"] == record["results"][local[0]][f"{metric},none"]
        assert 0 <= entry["value"] <= 1 and cells[column] == f"{100 * entry['value']:.1f}", (column, row)
    return cells


@pytest.mark.slow
def test_one_command_evaluates_a_trained_export():
    """The table of a trainer-made export (the harness's 24-step 2-rank run), five-shot as the cards."""
    out = h.BASE / "eval-reference"
    done = h.run([sys.executable, "-m", "doge.evaluate", "--model", str(h.reference_run() / "final"), "--limit", "4",
                  "--output", str(out), "--data", str(EVAL)])
    assert (out / "results.md").read_text() in done.stdout
    checked_table(out)
    assert json.loads((out / "results.json").read_text())["num_fewshot"] == 5


@pytest.mark.parametrize("flag, value, least", [("--limit", "0", 1), ("--batch-size", "0", 1),
                                                ("--num-fewshot", "-1", 0)])
def test_a_count_out_of_range_is_one_error_line(tmp_path, flag, value, least):
    (tmp_path / "config.json").write_text("{}")
    done = h.run([sys.executable, "-m", "doge.evaluate", "--model", str(tmp_path), flag, value], 2)
    assert done.stderr == f"error: {flag} {value}: give a number of at least {least}\n"


def test_table_takes_each_column_from_its_task_and_metric():
    """Local and hub task names fill the same column with the metric the Doge cards report."""
    results = {"mmlu": {"acc,none": 0.25, "acc_stderr,none": 0.01},
               "triviaqa": {"exact_match,remove_whitespace": 0.001},
               "arc_easy_local": {"acc,none": 0.5, "acc_norm,none": 0.4}, "hellaswag": {"acc_norm,none": 0.3},
               "winogrande_local": {"acc,none": 0.52}, "piqa": {"acc,none": 0.6}}
    row = table_row(results)
    assert row == {"MMLU": ("mmlu", 0.25), "TriviaQA": ("triviaqa", 0.001), "ARC-E": ("arc_easy_local", 0.4),
                   "ARC-C": None, "PIQA": None, "HellaSwag": ("hellaswag", 0.3), "OBQA": None,
                   "Winogrande": ("winogrande_local", 0.52)}
    assert "| m | 25.0 | 0.1 | 40.0 | - | - | 30.0 | - | 52.0 |" in markdown(row, "x/m", 5, None)
