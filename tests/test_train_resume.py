"""Kill -9 the whole job anywhere, even inside a
checkpoint write; the same command resumes and ends bit-identical to an uninterrupted run, on
the same W&B run id."""
import json
import random

import pytest
import train_harness as h

from doge.training.checkpoint import find_latest
from doge.training.schedule import WSD

pytestmark = pytest.mark.slow


def wandb_run_ids(rundir):
    return {p.name.rsplit("-", 1)[1] for p in (rundir / "wandb").glob("offline-run-*")}


def test_kill9_anywhere_resumes_bit_identical_on_same_wandb_run():
    reference, data = h.reference_run(), h.prepared()
    rundir = h.BASE / "killed"
    ckpts = rundir / "checkpoints"
    cmd = h.train_cmd(2, rundir, data, "--wandb", "offline", "--keep-last", "2", launcher="deepspeed")

    kill_at = random.randint(9, 15)  # strictly after the first checkpoint (step 8)
    job = h.start(cmd, rundir.parent / "killed-1.log")
    h.wait_for(lambda: h.last_step(rundir) >= kill_at, 400, f"step {kill_at}", job)
    h.kill9_group(job)
    assert find_latest(ckpts).name == "step-00000008", f"killed at step {kill_at}"

    # Same command; this time kill -9 while the step-16 checkpoint is half written.
    job = h.start(cmd, rundir.parent / "killed-2.log", DOGE_FAULT_PAUSE="save-state:16:300")
    h.wait_for(lambda: (ckpts / ".tmp-step-00000016" / "trainer_state.json").is_file(), 400, "the step-16 save", job)
    h.kill9_group(job)
    assert not (ckpts / "step-00000016").exists() and find_latest(ckpts).name == "step-00000008"

    done = h.run(cmd)
    assert "resumed from" in done.stdout and "step-00000008 at step 8" in done.stdout
    assert not list(ckpts.glob(".tmp-*")), "leftovers of the killed save are cleaned up"
    assert [p.name for p in sorted(ckpts.glob("step-*"))] == ["step-00000016", "step-00000024"], "keep-last 2"
    h.assert_bit_identical(h.final_weights(reference), h.final_weights(rundir))

    ours, theirs = h.train_lines(rundir), h.train_lines(reference)
    assert sorted(ours) == list(range(1, 25)), "metrics.jsonl reads like one run"
    wsd = WSD(3e-3, warmup_steps=4, decay_steps=8, max_steps=24)
    for step in range(1, 25):
        assert ours[step]["loss"] == theirs[step]["loss"], f"step {step}"
        assert ours[step]["lr"] == wsd(step - 1) and ours[step]["samples_consumed"] == theirs[step]["samples_consumed"]

    state = json.loads((find_latest(ckpts) / "trainer_state.json").read_text())
    assert wandb_run_ids(rundir) == {state["wandb_run_id"]}, "every restart logs to the same W&B run"
    assert len(list((rundir / "wandb").glob("offline-run-*"))) == 3
    # kill -9 also takes W&B's writer process, so only the finished attempt's history is certain.
    logged = b"".join(p.read_bytes() for p in (rundir / "wandb").glob("offline-run-*/*.wandb"))
    for step in range(9, 25):
        assert json.dumps(ours[step]["loss"]).encode() in logged, f"W&B offline run lacks step {step}'s loss"
