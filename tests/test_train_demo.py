"""The demo command (shortened) runs end to end, prints a sample from the export and, with
--eval-limit, writes the export's evaluation table; without a corpus folder beside the checkout it
still finds a corpus in Python's own documentation and source."""
import sys

import pytest
import train_harness as h
from test_evaluate import EVAL, checked_table

from doge.demo import build_corpus


def test_corpus_falls_back_to_python_stdlib(tmp_path):
    files = build_corpus(tmp_path / "corpus", shared=tmp_path / "absent")
    assert len(files) == 2 and all(h.Path(f).stat().st_size > 400_000 for f in files)


def test_evaluate_without_data_stops_before_training(tmp_path):
    done = h.run([sys.executable, "-m", "doge.demo", "--workdir", str(tmp_path / "demo"), "--evaluate"], 2,
                 DOGE_EVAL_DATA=str(tmp_path / "absent"))
    assert done.stderr.startswith("error: --evaluate: no evaluation data folder") and "DOGE_EVAL_DATA" in done.stderr
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_end_to_end_shortened():
    """The one command of the README (`python -m doge.demo --evaluate`), shortened: 20 training steps
    and the first 2 items of each evaluation task (of tests/assets/eval)."""
    h._make_base()
    work = h.BASE / "demo"
    done = h.run([sys.executable, "-m", "doge.demo", "--workdir", str(work), "--eval-limit", "2", "--max-steps", "20",
                  "--warmup-steps", "2", "--decay-steps", "5", "--save-interval", "10", "--eval-interval", "10"],
                 timeout=900, DOGE_EVAL_DATA=str(EVAL))
    assert "=== sample from" in done.stdout and "demo finished" in done.stdout
    sample = done.stdout.split("=== sample from", 1)[1].splitlines()[1]
    assert sample.startswith("The king said")  # decoded by stock transformers from the export (20 steps: gibberish)
    lines = h.train_lines(work / "run")
    assert lines[20]["loss"] < lines[10]["loss"] - 0.5  # the recipe logs every 10 steps
    final = work / "run" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (work / "run" / "loss.png").stat().st_size > 10_000
    table = (work / "run" / "eval" / "results.md").read_text()
    assert table in done.stdout and "5-shot, first 2 items per task" in table
    checked_table(work / "run" / "eval")
