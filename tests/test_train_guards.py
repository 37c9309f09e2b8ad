"""Guards: a non-finite loss/grad norm skips the update, is counted and logged, and K
in a row stop the run with a message naming the fix. The NaN is injected into the real loss of
steps 5 and 6 (DOGE_FAULT_NAN_STEPS), so DeepSpeed's own overflow handling is what is tested."""
import pytest
import torch
import train_harness as h

pytestmark = pytest.mark.slow
SHORT = ["--max-steps", "8", "--warmup-steps", "2", "--decay-steps", "2", "--save-interval", "2",
         "--eval-interval", "0", "--max-bad-steps", "3"]


def weights_at(rundir, step):
    """fp32 weights of a checkpoint, through the same export users run (any ZeRO stage)."""
    from safetensors.torch import load_file

    from doge.training.export import export

    out = export(rundir / "checkpoints" / f"step-{step:08d}", rundir / f"export-{step}")
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_nan_steps_skip_the_update_and_are_logged(zero):
    rundir = h.BASE / f"nan-{zero}"
    done = h.run(h.train_cmd(1, rundir, h.prepared(), *SHORT, zero=zero), DOGE_FAULT_NAN_STEPS="5,6")
    assert "step 5: non-finite loss nan" in done.stdout and "(2 in a row)" in done.stdout, done.stdout[-3000:]
    lines = h.train_lines(rundir)
    assert [lines[s]["loss"] is None for s in range(1, 9)] == [False] * 4 + [True] * 2 + [False] * 2
    assert lines[6]["skipped_steps"] == 2 and lines[8]["skipped_steps"] == 2
    at4, at6, at8 = (weights_at(rundir, s) for s in (4, 6, 8))
    h.assert_bit_identical(at4, at6)  # steps 5 and 6 changed nothing
    assert any(not torch.equal(at6[k], at8[k]) for k in at6)  # and training went on after them
    assert (rundir / "final" / "model.safetensors").is_file() and (rundir / "loss.png").is_file()


def test_k_nonfinite_steps_in_a_row_stop_the_run():
    rundir = h.BASE / "nan-stop"
    done = h.run(h.train_cmd(1, rundir, h.prepared(), *SHORT), expect_rc=1, DOGE_FAULT_NAN_STEPS="5,6,7")
    assert "3 non-finite steps in a row (--max-bad-steps 3): lower --lr" in done.stderr, done.stderr[-3000:]
    # the step-6 save fell inside the streak: skipped updates left its weights those of step 4
    assert (rundir / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert not (rundir / "final").exists()
