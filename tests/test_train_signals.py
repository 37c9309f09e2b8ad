"""Acceptance 5: a stop signal to the launcher writes a checkpoint and every process exits within
60 s. (Resuming from such a checkpoint is the same path test_train_resume covers.)"""
import os
import signal
import time

import pytest

import train_harness as h
from doge.checkpoint import TrainerState, find_latest

pytestmark = pytest.mark.slow


def stop_and_check(rundir, job, send, log, launcher_tracebacks=0):
    h.wait_for(lambda: h.last_step(rundir) >= 3, 400, "step 3", job)
    sent = time.time()
    send(job)
    job.wait(timeout=60)  # reap the launcher, then wait for the ranks it may have left
    h.wait_for(lambda: not h.group_alive(job.pid), 60 - (time.time() - sent), "every rank to exit", poll=0.2)
    ckpt = find_latest(rundir / "checkpoints")
    assert ckpt is not None and TrainerState.read(ckpt).step >= 3
    text = log.read_text()
    assert "(stop signal)" in text and text.count("Traceback") == launcher_tracebacks, text[-3000:]
    return TrainerState.read(ckpt).step


def test_sigusr1_to_deepspeed_launcher_group_saves_and_exits():
    """SLURM and a terminal deliver a signal to the launcher's process group, so the ranks see it too."""
    rundir, log = h.BASE / "sigusr1", h.BASE / "sigusr1.log"
    cmd = h.train_cmd(2, rundir, h.prepared(), "--save-interval", "0", launcher="deepspeed")
    job = h.start(cmd, log)
    step = stop_and_check(rundir, job, lambda j: os.killpg(j.pid, signal.SIGUSR1), log)
    assert 3 <= step < 24


def test_sigterm_to_torchrun_saves_and_exits():
    """torchrun forwards SIGTERM to its ranks, which save and exit; torchrun itself reports the signal."""
    rundir, log = h.BASE / "sigterm", h.BASE / "sigterm.log"
    cmd = h.train_cmd(2, rundir, h.prepared(), "--save-interval", "0", "--max-steps", "12", "--decay-steps", "4",
                      "--eval-interval", "0")
    job = h.start(cmd, log)
    step = stop_and_check(rundir, job, lambda j: j.send_signal(signal.SIGTERM), log, launcher_tracebacks=1)
    assert "SignalException: Process" in log.read_text() and 3 <= step < 12
