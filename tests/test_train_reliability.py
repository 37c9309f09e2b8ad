"""A run survives what clusters and people do to a RUNDIR: damaged checkpoints are skipped or
fall back (moved aside, never deleted), one job per RUNDIR, ranks die with their launcher, a
resume cannot silently change the model or the ZeRO stage, and status.json says how a run ended.
Kill -9 at 10 random points (steps, evaluation, between a checkpoint's files) still ends
bit-identical to an uninterrupted run."""
import json
import os
import random
import shutil
import signal
import sys
import time

import pytest
import train_harness as h

pytestmark = pytest.mark.slow
STEP8, STEP16 = "step-00000008", "step-00000016"


def seeded(name, damage):
    """A RUNDIR as a job killed after step 16 leaves it (`latest` still naming step 8), with
    `damage(step16_folder)` done to its newest checkpoint."""
    reference, rundir = h.reference_run(), h.BASE / name
    for tag in (STEP8, STEP16):
        shutil.copytree(reference / "checkpoints" / tag, rundir / "checkpoints" / tag)
    (rundir / "checkpoints" / "latest").write_text(STEP8 + "\n")
    shutil.copy(reference / "metrics.jsonl", rundir / "metrics.jsonl")
    damage(rundir / "checkpoints" / STEP16)
    return rundir


def garble(path):
    """Same size, other bytes: only a load can tell."""
    path.write_bytes(b"\0" * path.stat().st_size)


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda c: (c / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
     "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
], ids=["no-trainer-state", "no-optimizer-shard"])
def test_incomplete_newest_checkpoint_is_skipped_and_kept_aside(damage, reason):
    """Used to resume from step 8 and crash saving step 16 onto the folder left behind, every rerun."""
    rundir = seeded("skip-" + reason.split()[0].replace(".", "-"), damage)
    done = h.run(h.train_cmd(2, rundir, h.prepared()))
    assert f"skipped checkpoint {STEP16}: {reason}; moved to {rundir / 'checkpoints' / 'broken' / STEP16}" \
        in done.stdout and f"{STEP8} at step 8" in done.stdout, done.stdout[-3000:]
    assert (rundir / "checkpoints" / "broken" / STEP16).is_dir()
    h.assert_bit_identical(h.final_weights(h.reference_run()), h.final_weights(rundir))


def test_checkpoint_that_fails_to_load_falls_back_to_the_previous_one():
    """A pre-manifest checkpoint whose model states are garbage of the right size: DeepSpeed's
    load fails on every rank, the previous checkpoint is loaded and the run still ends exactly."""
    def damage(c):
        (c / "manifest.json").unlink()
        garble(c / "mp_rank_00_model_states.pt")
    rundir = seeded("fallback", damage)
    done = h.run(h.train_cmd(2, rundir, h.prepared()))
    assert (f"checkpoint {rundir / 'checkpoints' / STEP16} failed to load (" in done.stdout
            and "falling back to the previous complete checkpoint" in done.stdout
            and f"{STEP8} at step 8" in done.stdout), done.stdout[-3000:]
    assert (rundir / "checkpoints" / "broken" / STEP16 / "mp_rank_00_model_states.pt").is_file()
    h.assert_bit_identical(h.final_weights(h.reference_run()), h.final_weights(rundir))


def truncate_state(c):
    text = (c / "trainer_state.json").read_text()
    (c / "trainer_state.json").write_text(text[: len(text) // 2])


@pytest.mark.parametrize("flags, zero, message", [
    (["--model", "doge-20m"], "zero2", "--model doge-20m (model_overrides {}) differs from checkpoint"),
    ([], "zero3", "uses ZeRO stage 3 but checkpoint"),
    (["--expert-lr-scale", "10"], "zero2",
     "--expert-lr-scale (recipe key expert_lr_scale) = 10.0 differs from checkpoint"),
    (["--doc-mask", "true"], "zero2", "--doc-mask (recipe key doc_mask) = True differs from checkpoint"),
], ids=["other-model", "zero3-on-zero2-run", "other-expert-lr-scale", "doc-mask-on-unmasked-run"])
def test_resume_with_other_model_or_zero_stage_is_refused(flags, zero, message):
    rundir = h.reference_run()
    before = h.tree_digest(rundir)
    done = h.run(h.train_cmd(1, rundir, h.prepared(), *flags, zero=zero), expect_rc=2, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "trained as --model doge-tiny" in errors[0] or flags != ["--model", "doge-20m"]
    assert h.tree_digest(rundir) == before


def test_only_checkpoint_truncated_is_one_line():
    reference, rundir = h.reference_run(), h.BASE / "truncated"
    shutil.copytree(reference / "checkpoints" / STEP8, rundir / "checkpoints" / STEP8)
    truncate_state(rundir / "checkpoints" / STEP8)
    before = h.tree_digest(rundir)
    done = h.run(h.train_cmd(1, rundir, h.prepared()), expect_rc=2, timeout=300)
    assert (f"error: {rundir / 'checkpoints' / STEP8} is not a complete checkpoint (trainer_state.json has"
            in done.stderr and "Traceback" not in done.stderr), done.stderr[-3000:]
    assert h.tree_digest(rundir) == before


def doge_launch(rundir, *flags):
    cmd = h.train_cmd(2, rundir, h.prepared(), *flags, launcher="deepspeed")
    return [sys.executable, "-m", "doge.launch", *cmd[1:]]


def test_second_job_refused_and_launcher_death_takes_the_ranks():
    rundir, log = h.BASE / "locked", h.BASE / "locked.log"
    job = h.start(doge_launch(rundir), log, DOGE_FAULT_PAUSE="step:5")  # holds step 5 until killed
    h.wait_for(lambda: "fault pause: step step 5" in log.read_text(), 400, "step 5", job)
    assert json.loads((rundir / "status.json").read_text())["state"] == "running"

    started = time.time()
    done = h.run(doge_launch(rundir), expect_rc=2, timeout=120)
    assert time.time() - started < 60 and "is in use by another job (pid " in done.stderr, done.stderr[-3000:]
    assert job.poll() is None, "the running job is untouched"

    os.kill(job.pid, signal.SIGKILL)  # the launcher alone, as an OOM killer or a lost shell would
    job.wait()
    h.wait_for(lambda: not h.group_alive(job.pid), 30, "the ranks to die with their launcher", poll=0.2)
    done = h.run(doge_launch(rundir))
    assert "took over the stale lock" in done.stdout and "is gone" in done.stdout, done.stdout[-3000:]
    assert json.loads((rundir / "status.json").read_text()) == {"state": "finished", "reason": "done", "step": 24}
    assert not (rundir / "run.lock").exists()
    h.assert_bit_identical(h.final_weights(h.reference_run()), h.final_weights(rundir))


def test_status_file_on_crash_refusal_and_stop():
    rundir, data = h.BASE / "status", h.prepared()
    status = rundir / "status.json"
    h.run(h.train_cmd(1, rundir, data, "--max-bad-steps", "1"), expect_rc=1, DOGE_FAULT_NAN_STEPS="3")
    state = json.loads(status.read_text())
    assert state["state"] == "failed" and "non-finite" in state["reason"] and state["step"] == 3, state
    h.run(h.train_cmd(1, rundir, data, "--global-batch-tokens", "1000"), expect_rc=2)  # a retry that cannot start
    state = json.loads(status.read_text())
    assert state["state"] == "failed" and "--global-batch-tokens 1000" in state["reason"] and state["step"] == 3
    log = rundir.parent / "status-stop.log"
    job = h.start(h.train_cmd(1, rundir, data, "--save-interval", "0"), log)
    h.wait_for(lambda: json.loads(status.read_text())["state"] == "running", 300, "status running", job)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 0, log.read_text()[-3000:]
    state = json.loads(status.read_text())
    assert state["state"] == "stopped" and state["reason"] == "stop signal" and state["step"] >= 1, state


SAVE_POINTS = ["save-engine", "save-rng", "save-state", "save-manifest", "save-published", "save-latest"]
POINTS = ["step", "eval", *SAVE_POINTS]  # in the order a step passes them


def reachable_after(killed, then) -> bool:
    """A kill at or after `save-published` leaves step s's checkpoint complete: the rerun resumes at
    step s and never passes step s's points again."""
    return killed[0] < then[0] or POINTS.index(killed[1]) < POINTS.index("save-published")


def kill_points(rng, n=10):
    """n distinct (step, point) pairs where the tiny run pauses, in the order the restarts reach them."""
    candidates = ([(s, "step") for s in range(1, 25)] + [(s, "eval") for s in (12, 24)]
                  + [(s, p) for s in (8, 16, 24) for p in SAVE_POINTS])
    while True:
        chosen = sorted(rng.sample(candidates, n), key=lambda sp: (sp[0], POINTS.index(sp[1])))
        if all(reachable_after(a, b) for a, b in zip(chosen, chosen[1:])):
            return chosen


def test_kill9_at_ten_random_points_ends_bit_identical():
    seed = random.randrange(10**6)
    reference, rundir = h.reference_run(), h.BASE / "ten-kills"
    cmd = h.train_cmd(2, rundir, h.prepared(), launcher="deepspeed")
    for i, (step, point) in enumerate(kill_points(random.Random(seed))):
        log = h.BASE / f"ten-kills-{i}.log"
        job = h.start(cmd, log, DOGE_FAULT_PAUSE=f"{point}:{step}")
        h.wait_for(lambda: f"fault pause: {point} step {step}" in log.read_text(), 400,
                   f"seed {seed}: {point} at step {step}", job)
        h.kill9_group(job)
    done = h.run(cmd)
    assert "skipped checkpoint" not in done.stdout, f"seed {seed}: a kill never leaves an incomplete folder"
    h.assert_bit_identical(h.final_weights(reference), h.final_weights(rundir))
    assert sorted(h.train_lines(rundir)) == list(range(1, 25)), f"seed {seed}"
