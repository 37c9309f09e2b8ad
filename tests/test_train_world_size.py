"""Resume on a different world size (2 -> 1, then 1 -> 2) through DeepSpeed's
universal checkpoint, converted automatically; training continues from the same step on exactly
the uninterrupted run's samples."""
import shutil

import pytest
import train_harness as h

pytestmark = pytest.mark.slow


def seed_run(rundir, source_ckpt, metrics_from):
    """A RUNDIR as a job killed right after `source_ckpt` was written leaves it."""
    shutil.copytree(source_ckpt, rundir / "checkpoints" / source_ckpt.name)
    (rundir / "checkpoints" / "latest").write_text(source_ckpt.name + "\n")
    shutil.copy(metrics_from / "metrics.jsonl", rundir / "metrics.jsonl")


def check_continues(rundir, reference, resumed_at, done):
    assert f"at step {resumed_at}" in done.stdout
    assert (rundir / "checkpoints" / "universal" / f"step-{resumed_at:08d}").is_dir() or \
        not (rundir / "checkpoints" / f"step-{resumed_at:08d}").exists()  # pruned with its source
    ours, theirs = h.train_lines(rundir), h.train_lines(reference)
    assert sorted(ours) == list(range(1, 25))
    for step in range(resumed_at + 1, 25):
        assert ours[step]["samples_consumed"] == theirs[step]["samples_consumed"] == step * h.GLOBAL_SAMPLES
        # Same samples and restored weights: equal up to float32 reduction order (measured <= 1e-6;
        # other samples would differ by ~1e-1).
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], abs=1e-5), f"step {step}"


def test_two_to_one_to_two_ranks():
    reference, data = h.reference_run(), h.prepared()
    one = h.BASE / "world-2to1"
    seed_run(one, reference / "checkpoints" / "step-00000008", reference)
    done = h.run(h.train_cmd(1, one, data))
    assert "world 1" in done.stdout
    check_continues(one, reference, 8, done)

    two = h.BASE / "world-1to2"
    seed_run(two, one / "checkpoints" / "step-00000016", one)
    done = h.run(h.train_cmd(2, two, data))
    assert "world 2" in done.stdout
    check_continues(two, reference, 16, done)
