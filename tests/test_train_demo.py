"""The demo command (shortened) runs end to end and prints a sample from the export;
and without ../shared it still finds a corpus in Python's own documentation and source."""
import sys

import pytest
import train_harness as h

from doge.demo import build_corpus


def test_corpus_falls_back_to_python_stdlib(tmp_path):
    files = build_corpus(tmp_path / "corpus", shared=tmp_path / "absent")
    assert len(files) == 2 and all(h.Path(f).stat().st_size > 400_000 for f in files)


@pytest.mark.slow
def test_demo_end_to_end_shortened():
    h.require_shared_data()
    h._make_base()
    work = h.BASE / "demo"
    done = h.run([sys.executable, "-m", "doge.demo", "--workdir", str(work), "--max-steps", "20",
                  "--warmup-steps", "2", "--decay-steps", "5", "--save-interval", "10", "--eval-interval", "10"],
                 timeout=900)
    assert "=== sample from" in done.stdout and "demo finished" in done.stdout
    sample = done.stdout.split("=== sample from", 1)[1].splitlines()[1]
    assert sample.startswith("The king said")  # decoded by stock transformers from the export (20 steps: gibberish)
    lines = h.train_lines(work / "run")
    assert lines[20]["loss"] < lines[10]["loss"] - 0.5  # the recipe logs every 10 steps
    final = work / "run" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert (work / "run" / "loss.png").stat().st_size > 10_000
