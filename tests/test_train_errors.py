"""Guards: config errors stop a real trainer process before the first step, with exit 2 and a
message naming the field and the fix, and leave the run folder untouched."""
import sys

import pytest
import train_harness as h

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-tokens", "1000"], "--global-batch-tokens 1000 is not a multiple of --seq-len 64"),
    (["--seq-len", "128"], "rows hold 64 tokens, fewer than seq_len 128"),
    (["--data", "/nonexistent/datadir"], "--data /nonexistent/datadir"),
    (["--resume", "never"], "--resume is never"),
])
def test_config_error_names_field_and_fix(flags, message):
    rundir = h.reference_run()
    before = h.tree_digest(rundir)
    cmd = h.train_cmd(1, rundir, h.prepared(), *flags)
    done = h.run(cmd, expect_rc=2, timeout=300)
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert h.tree_digest(rundir) == before


def test_batch_not_divisible_by_micro_batch_times_world():
    done = h.run(h.train_cmd(1, h.BASE / "bad-micro", h.prepared(), "--micro-batch-size", "3"), expect_rc=2)
    assert ("global batch of 16 samples is not divisible by --micro-batch-size 3 x world size 1" in done.stderr
            and "Traceback" not in done.stderr), done.stderr[-2000:]
    assert not (h.BASE / "bad-micro" / "checkpoints").exists()


def test_model_vocab_smaller_than_tokenizer(tmp_path):
    recipe = tmp_path / "small-vocab.yaml"
    recipe.write_text((h.REPO / "recipes" / "doge-tiny.yaml").read_text() + "model_overrides: {vocab_size: 512}\n")
    done = h.run(h.train_cmd(1, tmp_path / "run", h.prepared(), "--recipe", str(recipe)), expect_rc=2)
    assert "but the model's vocab_size is 512: set model_overrides" in done.stderr, done.stderr[-2000:]


def test_init_from_checkpoint_with_data_of_another_tokenizer(tmp_path):
    """Continuing a run on data tokenised differently would train on garbage ids: refused up front."""
    other_tok, other_data = tmp_path / "tok", tmp_path / "data"
    h.run([sys.executable, "data_tools/train_tokenizer.py", "--input", str(h.PRETRAIN / "python_doc_topics.txt"),
           "--vocab-size", "800", "--output", str(other_tok)])
    h.run([sys.executable, "data_tools/prepare.py", "--input", str(h.PRETRAIN / "python_doc_topics.txt"),
           "--tokenizer", str(other_tok), "--seq-len", str(h.SEQ_LEN), "--output", str(other_data), "--workers", "1"])
    source = h.reference_run() / "checkpoints" / "step-00000016"
    before = h.tree_digest(source)
    done = h.run(h.train_cmd(1, tmp_path / "run", other_data, "--init-from", str(source), "--eval-interval", "0"),
                 expect_rc=2)
    assert "but the checkpoint was trained with" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert h.tree_digest(source) == before
