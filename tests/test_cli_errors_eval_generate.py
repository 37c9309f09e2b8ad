"""Bad input to `python -m doge.evaluate` and `python -m doge.generate`: exit 2 and exactly one
`error: ...` line naming the flag or file and the fix, no traceback, nothing created, and, where
the input can be checked early, refused before lm-eval or the model loads.

Most cases call `main(argv)` in this process with the loading step replaced by one that fails
the test; a few run as real `python -m` processes to prove there is no traceback and that the
refusal comes within seconds of starting (import time included).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_harness as h
from conftest import ASSETS
from test_evaluate import tiny_export

from doge import evaluate, generate
from doge.data.errors import DataError
from doge.eval_tasks import harness, local_data

EVAL = ASSETS / "eval"  # 25 rows per JSONL task; MMLU: 3 test and 5 dev rows per subject
EARLY_S = 5.0  # a check done before lm-eval or the model loads answers within this (subprocess, imports included)


def tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """The tests' tiny export (test_evaluate), copied to a folder of its own: the default --output
    (EXPORT/../eval) lands beside it, where each test checks nothing appeared."""
    folder = tmp_path_factory.mktemp("cli-errors") / "export"
    shutil.copytree(tiny_export(), folder)
    return folder


def call(main, argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc: int, err: str, needles) -> str:
    lines = err.splitlines()
    assert rc == 2, (rc, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def loading_fails(*_args, **_kwargs):
    raise AssertionError("lm-eval or the model was loaded for input that could be checked before")


# ---------------------------------------------------------------- case builders

def data_with(edit):
    """A copy of the shipped evaluation files with `edit(folder)` applied."""
    def setup(tmp: Path, export: Path) -> dict:
        data = tmp / "data"
        shutil.copytree(EVAL, data)
        edit(data)
        return {"data": data}
    return setup


def export_with(edit):
    """A copy of the export with `edit(folder)` applied."""
    def setup(tmp: Path, export: Path) -> dict:
        model = tmp / "model"
        shutil.copytree(export, model)
        edit(model)
        return {"model": model}
    return setup


def remove(*names):
    def edit(folder: Path):
        for name in names:
            (folder / name).unlink()
    return edit


def rewrite_jsonl(name: str, change):
    """Each row of NAME replaced by change(row) (a dict, or a raw line as str)."""
    def edit(folder: Path):
        path = folder / name
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        lines = [change(i, row) for i, row in enumerate(rows, 1)]
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return edit


def replace_line(name: str, number: int, text: str | bytes):
    def edit(folder: Path):
        lines = (folder / name).read_bytes().splitlines(keepends=True)
        lines[number - 1] = text if isinstance(text, bytes) else text.encode() + b"\n"
        (folder / name).write_bytes(b"".join(lines))
    return edit


def with_config(**changes):
    def edit(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def output_file(tmp: Path, export: Path) -> dict:
    (tmp / "taken").write_text("a file\n")
    return {"out": tmp / "taken"}


def output_below_file(tmp: Path, export: Path) -> dict:
    (tmp / "taken").write_text("a file\n")
    return {"out": tmp / "taken" / "eval"}


def output_results_is_folder(tmp: Path, export: Path) -> dict:
    (tmp / "out" / "results.json").mkdir(parents=True)
    return {"out": tmp / "out"}


def nothing(tmp: Path, export: Path) -> dict:
    return {}


def sharded_without_shards(folder: Path):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))


def no_answers(i, row):
    return {k: v for k, v in row.items() if k != "gold"}


def gold_out_of_range(i, row):
    return {**row, "gold": 4} if i == 7 else row


PIQA = EVAL / "piqa.jsonl"
EVALUATE_CASES = [
    # (id, setup, extra flags, what the error line names)
    ("tasks-empty", nothing, ["--tasks", ""], ["--tasks ''", "give comma-separated task names"]),
    ("tasks-stray-comma", nothing, ["--tasks", "piqa_local,"], ["--tasks 'piqa_local,'", "stray comma"]),
    ("tasks-misspelled-local", nothing, ["--tasks", "arc_eazy_local"],
     ["--tasks arc_eazy_local: no such task", "did you mean arc_easy_local", "lm-eval ls tasks"]),
    ("tasks-misspelled-mmlu-subject", nothing, ["--tasks", "mmlu_local_anatomyy"],
     ["did you mean mmlu_local_anatomy"]),
    ("tasks-repeated", nothing, ["--tasks", "piqa_local, piqa_local"], ["piqa_local named twice"]),
    ("tasks-group-and-member", nothing, ["--tasks", "mmlu_local,mmlu_local_anatomy"],
     ["mmlu_local_anatomy is also part of mmlu_local"]),
    ("fewshot-beyond-test-file", nothing, ["--tasks", "piqa_local", "--num-fewshot", "25"],
     ["--num-fewshot 25: piqa_local has 24 shots", "piqa.jsonl", "give --num-fewshot 24 or less"]),
    ("fewshot-beyond-mmlu-dev", nothing, ["--num-fewshot", "6"],
     ["--num-fewshot 6: mmlu_local_", "has 5 shots", "_dev.csv", "give --num-fewshot 5 or less"]),
    ("count-batch-size", nothing, ["--batch-size", "0"], ["--batch-size 0: give a number of at least 1"]),
    ("flag-not-a-number", nothing, ["--limit", "x"], ["--limit", "invalid int value", "--help"]),
    ("output-is-file", output_file, [], ["--output", "taken: a file, not a folder", "give --output a folder"]),
    ("output-below-file", output_below_file, [], ["taken is a file, not a folder"]),
    ("output-results-is-folder", output_results_is_folder, [], ["results.json is not a file"]),
    ("model-missing", lambda tmp, export: {"model": tmp / "nope"}, [], ["--model", "nope: no such folder"]),
    ("model-no-config", export_with(remove("config.json")), [], ["not an export folder (no config.json)"]),
    ("model-config-not-json", export_with(lambda f: (f / "config.json").write_text("{oops")),
     [], ["config.json is unreadable", "export the model again"]),
    ("model-not-doge", export_with(with_config(model_type="llama")), [], ["model_type 'llama', not 'doge'"]),
    ("model-no-weights", export_with(remove("model.safetensors")), [],
     ["config.json but no weights", "model.safetensors", "export the checkpoint again"]),
    ("model-missing-shard", export_with(sharded_without_shards), [],
     ["model.safetensors.index.json names 1 missing shard(s)", "model-00001-of-00002.safetensors"]),
    ("model-no-tokenizer", export_with(remove("tokenizer.json", "tokenizer_config.json")), [],
     ["no tokenizer", "copy the tokenizer"]),
    ("data-missing", lambda tmp, export: {"data": tmp / "nodata"}, [], ["--data", "nodata: no such folder"]),
    ("data-file-missing", data_with(remove("piqa.jsonl")), ["--tasks", "piqa_local"],
     ["piqa.jsonl: no evaluation file", "set --data (or DOGE_EVAL_DATA)"]),
    ("jsonl-not-json", data_with(replace_line("arc_easy.jsonl", 3, '{"query": "Q", "choices": ["a", "b"]')),
     ["--tasks", "arc_easy_local"], ["arc_easy.jsonl line 3: not JSON", "fix or delete the line"]),
    ("jsonl-not-utf8", data_with(replace_line("piqa.jsonl", 2, b'{"query": "\xff"}\n')),
     ["--tasks", "piqa_local"], ["piqa.jsonl line 2: not UTF-8", "save the file as UTF-8"]),
    ("jsonl-not-object", data_with(replace_line("piqa.jsonl", 5, "[1, 2]")), ["--tasks", "piqa_local"],
     ["piqa.jsonl line 5: a JSON object with query, choices, gold expected"]),
    ("jsonl-no-answers", data_with(rewrite_jsonl("openbook_qa.jsonl", no_answers)), ["--tasks", "openbookqa_local"],
     ["openbook_qa.jsonl line 1: no 'gold' field (the answer", "cannot be scored"]),
    ("jsonl-gold-out-of-range", data_with(rewrite_jsonl("arc_challenge.jsonl", gold_out_of_range)),
     ["--tasks", "arc_challenge_local"], ["arc_challenge.jsonl line 7: 'gold' (the answer) is 4, not an index 0..3"]),
    ("winogrande-no-options", data_with(rewrite_jsonl("winogrande.jsonl",
                                                      lambda i, r: {**r, "context_options": "x"} if i == 2 else r)),
     ["--tasks", "winogrande_local"], ["winogrande.jsonl line 2: 'context_options' must be a list"]),
    ("mmlu-no-answer-column", data_with(replace_line("mmlu/dev/anatomy_dev.csv", 2, "Q?,a,b,c,d")),
     ["--tasks", "mmlu_local"], ["anatomy_dev.csv line 2: 5 fields (no answer column)", "expected 6"]),
    ("mmlu-answer-not-a-letter", data_with(replace_line("mmlu/test/virology_test.csv", 3, "Q?,a,b,c,d,E")),
     ["--tasks", "mmlu_local_virology"], ["virology_test.csv line 3: answer 'E' is not one of A, B, C, D"]),
    ("mmlu-file-missing", data_with(remove("mmlu/test/sociology_test.csv")), [],
     ["sociology_test.csv: no MMLU file"]),
]


@pytest.mark.parametrize("setup, flags, needles", [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_refuses_before_loading(export, tmp_path, capsys, monkeypatch, setup, flags, needles):
    monkeypatch.setattr(evaluate, "evaluate", loading_fails)
    monkeypatch.setenv("DOGE_EVAL_DATA", str(tmp_path / "unset"))  # main sets it from --data; restored after
    paths = {"model": export, "data": EVAL, "out": tmp_path / "out", **setup(tmp_path, export)}
    before, export_before = tree(tmp_path), tree(export.parent)
    argv = ["--model", paths["model"], "--data", paths["data"], "--output", paths["out"], *flags]
    rc, out, err = call(evaluate.main, argv, capsys)
    assert_one_error(rc, err, needles)
    assert out == "" and tree(tmp_path) == before and tree(export.parent) == export_before


def test_default_output_beside_the_export_is_checked_and_not_created(export, tmp_path, capsys, monkeypatch):
    """Without --output the folder is EXPORT/../eval: a file there is refused, nothing is made."""
    monkeypatch.setattr(evaluate, "evaluate", loading_fails)
    monkeypatch.setenv("DOGE_EVAL_DATA", str(EVAL))
    model = tmp_path / "run" / "final"
    shutil.copytree(export, model)
    (tmp_path / "run" / "eval").write_text("a file\n")
    before = tree(tmp_path)
    rc, _, err = call(evaluate.main, ["--model", model], capsys)
    assert_one_error(rc, err, [f"--output {tmp_path / 'run' / 'eval'}: a file, not a folder"])
    assert tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_evaluate_refuses_an_unwritable_output(export, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate", loading_fails)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rc, _, err = call(evaluate.main, ["--model", export, "--data", EVAL, "--output", locked / "eval"], capsys)
    assert_one_error(rc, err, [f"{locked} is not writable"])
    assert not (locked / "eval").exists()


def test_an_unknown_lm_eval_name_is_refused_before_the_model_loads(export, tmp_path, capsys, monkeypatch):
    """A name that is no local task is looked up in lm-eval's task index (some seconds), with close
    matches, before the model loads; nothing is written."""
    from doge.model.modeling import DogeForCausalLM

    monkeypatch.setattr(DogeForCausalLM, "from_pretrained", loading_fails)
    monkeypatch.setenv("DOGE_EVAL_DATA", str(EVAL))
    rc, out, err = call(evaluate.main, ["--model", export, "--tasks", "piqa_local,hellaswg", "--output",
                                        tmp_path / "out", "--num-fewshot", "0"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--tasks hellaswg: no such task; did you mean hellaswag" in lines[0] and "lm-eval ls tasks" in lines[0]
    assert not (tmp_path / "out").exists()


def test_rows_without_an_answer_are_refused_not_scored(tmp_path, monkeypatch):
    """lm-eval's path into the data (local_data.load, called by each task's custom_dataset): a file
    whose rows lack `gold` is an error naming file, line and field, never a task scored 0%."""
    rewrite_jsonl("piqa.jsonl", no_answers)(shutil.copytree(EVAL, tmp_path / "data"))
    monkeypatch.setenv("DOGE_EVAL_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError, match=r"piqa.jsonl line 1: no 'gold' field \(the answer; a row without one cannot"):
        local_data.load(file="piqa.jsonl")
    replace_line("mmlu/test/anatomy_test.csv", 2, "Q?,a,b,c,d,")(tmp_path / "data")
    with pytest.raises(DataError, match=r"anatomy_test.csv line 2: answer '' is not one of A, B, C, D"):
        local_data.load(subject="anatomy")
    dataset = local_data.load(file="winogrande.jsonl", format="partial")  # the shipped rows load whole
    assert len(dataset["test"]) == 25 and set(dataset["test"][0]) == {"context_options", "continuation", "gold"}


def test_local_task_definitions_are_known_without_lm_eval():
    """Every YAML of doge/eval_tasks reads as a task (with its data file or MMLU subject) or the
    mmlu_local group of 57 subject tasks: the names the early --tasks check knows."""
    tasks, groups = harness.local_tasks()
    assert set(groups) == {"mmlu_local"} and len(groups["mmlu_local"]) == 57
    assert set(groups["mmlu_local"]) | set(evaluate.LOCAL_TASKS[1:]) == set(tasks)
    for name, config in tasks.items():
        kwargs = config["dataset_kwargs"]
        assert ("subject" in kwargs) != ("file" in kwargs), name
        assert config.get("fewshot_split") in ("test", "dev"), name
        if "file" in kwargs:
            assert (EVAL / kwargs["file"]).is_file() and kwargs.get("format", "choice") in local_data.TASK_FORMATS, name


# ---------------------------------------------------------------- generate

def short_positions(folder: Path):
    with_config(max_position_embeddings=16)(folder)


def no_chat_template(folder: Path):
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


LONG_PROMPT = "The king said to the queen that the kingdom was lost and all the people wept for many days"
GENERATE_CASES = [
    # (id, export edit or None, flags, what the error line names); checked before the tokenizer loads
    ("prompt-empty", None, ["--prompt", ""], ["--prompt is empty"]),
    ("prompt-blank", None, ["--prompt", "  \n"], ["--prompt is empty"]),
    ("max-new-tokens-0", None, ["--max-new-tokens", "0"], ["--max-new-tokens 0: give a number of at least 1"]),
    ("max-new-tokens-negative", None, ["--max-new-tokens", "-3"], ["--max-new-tokens -3"]),
    ("temperature-nan", None, ["--temperature", "nan"], ["--temperature nan", "give 0 for greedy"]),
    ("temperature-inf", None, ["--temperature", "inf"], ["--temperature inf"]),
    ("temperature-negative", None, ["--temperature", "-0.5"], ["--temperature -0.5", "finite number > 0"]),
    ("threads-0", None, ["--threads", "0"], ["--threads 0: give a number of at least 1"]),
    ("seed-too-big", None, ["--seed", str(2 ** 64)], ["--seed", "2**64 - 1"]),
    ("flag-not-a-number", None, ["--max-new-tokens", "many"], ["--max-new-tokens", "invalid int value"]),
    ("model-no-weights", remove("model.safetensors"), [], ["config.json but no weights"]),
    ("model-no-config", remove("config.json"), [], ["not an export folder (no config.json)"]),
    ("model-no-tokenizer", remove("tokenizer.json", "tokenizer_config.json"), [], ["no tokenizer"]),
    ("chat-without-template", no_chat_template, ["--chat"], ["--chat: the tokenizer of", "has no chat template",
                                                              "leave out --chat"]),
]


@pytest.mark.parametrize("edit, flags, needles", [c[1:] for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES])
def test_generate_refuses_before_loading(export, tmp_path, capsys, monkeypatch, edit, flags, needles):
    monkeypatch.setattr(generate, "load", loading_fails)
    model = export
    if edit is not None:
        model = tmp_path / "model"
        shutil.copytree(export, model)
        edit(model)
    before = tree(model.parent)
    rc, out, err = call(generate.main, ["--model", model, "--prompt", "The king", *flags], capsys)
    assert_one_error(rc, err, needles)
    assert out == "" and tree(model.parent) == before


def test_generate_missing_model_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate, "load", loading_fails)
    rc, _, err = call(generate.main, ["--model", tmp_path / "nope", "--prompt", "hi"], capsys)
    assert_one_error(rc, err, [f"--model {tmp_path / 'nope'}: no such folder"])


@pytest.fixture
def short_export(export, tmp_path) -> Path:
    """The export with 16 positions (max_position_embeddings), so prompts can pass them."""
    model = tmp_path / "short"
    shutil.copytree(export, model)
    short_positions(model)
    return model


def test_a_prompt_longer_than_the_positions_is_refused_before_the_weights_load(short_export, capsys, monkeypatch):
    from doge.model.modeling import DogeForCausalLM

    monkeypatch.setattr(DogeForCausalLM, "from_pretrained", loading_fails)
    rc, out, err = call(generate.main, ["--model", short_export, "--prompt", LONG_PROMPT], capsys)
    line = assert_one_error(rc, err, ["--prompt:", "tokens, but the model has 16 positions (max_position_embeddings)",
                                      "shorten the prompt to at most 15 tokens"])
    assert int(line.split("--prompt: ")[1].split()[0]) > 16 and out == ""


def test_new_tokens_beyond_the_positions_are_cut_with_a_note(short_export, capsys):
    rc, out, err = call(generate.main, ["--model", short_export, "--prompt", "The king", "--max-new-tokens", "40"],
                        capsys)
    assert rc == 0 and "Traceback" not in err, err
    note = next(line for line in err.splitlines() if line.startswith("note:"))
    cut = int(note.split(" cut to ")[1].split(":")[0])
    prompt_len = int(err.rsplit("[", 1)[1].split()[0])
    assert prompt_len + cut == 16 and "--max-new-tokens 40 cut to" in note, err
    assert int(err.rsplit("[", 1)[1].split()[3]) <= cut


def test_generate_unreadable_weights_are_one_error_line(export, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(export, model)
    (model / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes()[:20])
    rc, out, err = call(generate.main, ["--model", model, "--prompt", "The king", "--max-new-tokens", "2"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"--model {model}: cannot load the weights" in lines[0] and "export the checkpoint again" in lines[0]


# ---------------------------------------------------------------- real processes: no traceback, answered early

def run_cli(module: str, *argv) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          env=h.env(), cwd=h.REPO, timeout=120)
    return done, time.perf_counter() - start


SUBPROCESS_CASES = [
    ("evaluate-empty-tasks", "doge.evaluate", nothing, ["--tasks", ""], ["--tasks ''"]),
    ("evaluate-no-answers", "doge.evaluate", data_with(rewrite_jsonl("piqa.jsonl", no_answers)),
     ["--tasks", "piqa_local"], ["piqa.jsonl line 1: no 'gold' field"]),
    ("evaluate-fewshot", "doge.evaluate", nothing, ["--num-fewshot", "30"], ["--num-fewshot 30: mmlu_local_"]),
    ("generate-temperature-nan", "doge.generate", nothing, ["--prompt", "x", "--temperature", "nan"],
     ["--temperature nan"]),
    ("generate-no-weights", "doge.generate", export_with(remove("model.safetensors")), ["--prompt", "x"],
     ["config.json but no weights"]),
    ("generate-chat-without-template", "doge.generate", export_with(no_chat_template), ["--prompt", "x", "--chat"],
     ["has no chat template"]),
]


@pytest.mark.parametrize("module, setup, flags, needles", [c[1:] for c in SUBPROCESS_CASES],
                         ids=[c[0] for c in SUBPROCESS_CASES])
def test_cli_answers_bad_input_within_seconds(export, tmp_path, module, setup, flags, needles):
    paths = {"model": export, "data": EVAL, **setup(tmp_path, export)}
    argv = ["--model", paths["model"], *flags]
    if module == "doge.evaluate":
        argv += ["--data", paths["data"], "--output", tmp_path / "out"]
    before = tree(tmp_path)
    done, seconds = run_cli(module, *argv)
    assert_one_error(done.returncode, done.stderr, needles)
    assert seconds < EARLY_S, (seconds, done.stderr)
    assert tree(tmp_path) == before and done.stdout == ""
