"""`python -m doge.evaluate`: lm-eval on our model equals log-likelihood scoring done here by hand.

The reference builds each prompt from the raw files itself (lm-eval's zero-shot formats: ARC and
PIQA "Question: ...\\nAnswer:", OBQA the bare question, WinoGrande each context option before the
shared continuation, MMLU the subject line, question, lettered options and "Answer:"), scores
every choice as the sum of its continuation tokens' log-probs given the context (the
continuation's tokens are those of context + " " + choice after the context's), and takes the
argmax; acc_norm divides by the choice's length in characters, as lm-eval's acc_norm does
(its acc_bytes divides by UTF-8 bytes; ARC-Challenge has non-ASCII choices, so they differ).
"""
from __future__ import annotations

import csv
import functools
import json
import sys

import pytest
import torch
import train_harness as h

from doge.evaluate import COLUMNS, LOCAL_TASKS, markdown, table_row

EVAL = h.REPO.parent / "shared" / "data" / "eval"
LIMIT = 20
MMLU_SUBJECTS = ("abstract_algebra", "anatomy", "high_school_world_history")  # the last: long prompts


def require_eval_data() -> None:
    if not EVAL.is_dir():
        pytest.skip(f"{EVAL} is absent: the evaluation tests need the shared evaluation files")


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
    tasks.update({f"mmlu_local_{s}": mmlu_items(EVAL / "mmlu" / "test" / f"{s}_test.csv") for s in MMLU_SUBJECTS})
    return tasks


def mmlu_items(path):
    subject = path.name[: -len("_test.csv")].replace("_", " ")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[:LIMIT]
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    return [([(head + r[0].strip() + "".join(f"\n{x}. {c}" for x, c in zip("ABCD", r[1:5])) + "\nAnswer:", " " + x)
              for x in "ABCD"], list("ABCD"), "ABCD".index(r[5].strip())) for r in rows]


def log_likelihoods(model, tok, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Summed continuation log-probs of each (context, continuation), the pairs right-padded into
    one batch (a causal model's earlier positions never see the padding)."""
    wholes = [tok(c + x)["input_ids"] for c, x in pairs]
    starts = [len(tok(c)["input_ids"]) for c, _ in pairs]
    width = max(map(len, wholes))
    logits = model(torch.tensor([w + [0] * (width - len(w)) for w in wholes])).logits.float().log_softmax(-1)
    return torch.tensor([sum(float(logits[row, i - 1, w[i]]) for i in range(start, len(w)))
                         for row, (w, start) in enumerate(zip(wholes, starts))])


@torch.inference_mode()
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
    """Every local task, MMLU as three of its subjects (each an lm-eval task of the mmlu_local group)."""
    require_eval_data()
    export, out = tiny_export(), h.BASE / "eval-tiny-results"
    tasks = ",".join([t for t in LOCAL_TASKS if t != "mmlu_local"] + [f"mmlu_local_{s}" for s in MMLU_SUBJECTS])
    h.run([sys.executable, "-m", "doge.evaluate", "--model", str(export), "--tasks", tasks, "--num-fewshot", "0",
           "--limit", str(LIMIT), "--batch-size", "32", "--output", str(out), "--data", str(EVAL)])
    got = json.loads((out / "results.json").read_text())["results"]
    expected = reference_scores(export)
    for task, scores in expected.items():
        for metric in ("acc", "acc_norm") if task.split("_local")[0] in ("arc_easy", "arc_challenge", "piqa",
                                                                          "openbookqa") else ("acc",):
            assert got[task][f"{metric},none"] == pytest.approx(scores[metric], abs=1e-9), (task, metric)
    assert all(scores["items"] == LIMIT for scores in expected.values())


@pytest.mark.slow
def test_one_command_evaluates_a_trained_export():
    """The table of a trainer-made export (the harness's 24-step 2-rank run), five-shot as the cards."""
    require_eval_data()
    out = h.BASE / "eval-reference"
    done = h.run([sys.executable, "-m", "doge.evaluate", "--model", str(h.reference_run() / "final"), "--limit", "4",
                  "--output", str(out)])
    table = (out / "results.md").read_text()
    assert table in done.stdout
    head, _, row = table.splitlines()[:3]
    assert head == "| model | " + " | ".join(f"{column} ({metric})" for column, metric, _ in COLUMNS) + " |"
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    filled = [c for c, (column, _, _) in zip(cells, COLUMNS) if column not in ("TriviaQA", "HellaSwag")]
    assert cells[1] == cells[5] == "-" and all(0 <= float(c) <= 100 for c in filled), row
    assert json.loads((out / "results.json").read_text())["num_fewshot"] == 5


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
