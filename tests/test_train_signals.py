"""A stop signal to the launcher writes a checkpoint and every process exits 0 within
60 s. (Resuming from such a checkpoint is the same path test_train_resume covers.)"""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import train_harness as h

from doge.training.checkpoint import TrainerState, find_latest

pytestmark = pytest.mark.slow


def stop_and_check(rundir, job, send, log, launcher_rc=0, launcher_tracebacks=0):
    sent = time.time()
    send(job)
    assert job.wait(timeout=60) == launcher_rc, log.read_text()[-3000:]
    h.wait_for(lambda: not h.group_alive(job.pid), 60 - (time.time() - sent), "every rank to exit", poll=0.2)
    ckpt = find_latest(rundir / "checkpoints")
    assert ckpt is not None, log.read_text()[-3000:]
    text = log.read_text()
    assert "(stop signal)" in text and text.count("Traceback") == launcher_tracebacks, text[-3000:]
    return TrainerState.read(ckpt).step


def doge_launch_cmd(rundir):
    """`python -m doge.launch` takes exactly the `deepspeed` command's arguments."""
    cmd = h.train_cmd(2, rundir, h.prepared(), "--save-interval", "0", launcher="deepspeed")
    assert cmd[0] == "deepspeed"
    return [sys.executable, "-m", "doge.launch", *cmd[1:]]


def test_sigusr1_to_the_launcher_process_saves_and_exits_0():
    """SIGUSR1 to the launcher's pid alone (`kill -USR1 PID`): the ranks save, everything exits 0."""
    rundir, log = h.BASE / "sigusr1", h.BASE / "sigusr1.log"
    job = h.start(doge_launch_cmd(rundir), log)
    h.wait_for(lambda: h.last_step(rundir) >= 3, 400, "step 3", job)
    step = stop_and_check(rundir, job, lambda j: j.send_signal(signal.SIGUSR1), log)
    assert 3 <= step < 24


def test_sigusr1_to_the_group_while_ranks_start_saves_and_exits_0():
    """SLURM and a terminal signal the whole process group; here it lands while the ranks are still
    importing (no handler yet, the signal is ignored there), so the launcher's re-sent request is
    what stops them, after their first step."""
    rundir, log = h.BASE / "sigusr1-group", h.BASE / "sigusr1-group.log"
    job = h.start(doge_launch_cmd(rundir), log)
    h.wait_for(lambda: len([p for p in psutil.Process(job.pid).children(recursive=True)
                            if "doge/train.py" in p.cmdline()]) == 2, 120, "2 ranks to start", job)
    assert h.last_step(rundir) == 0
    step = stop_and_check(rundir, job, lambda j: os.killpg(j.pid, signal.SIGUSR1), log)
    assert 1 <= step < 24


def test_plain_deepspeed_launcher_dies_on_sigusr1(tmp_path):
    """Why doge.launch exists: DeepSpeed's own runner takes SIGUSR1's default action (killed)."""
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(60)\n")
    job = subprocess.Popen(["deepspeed", "--num_gpus", "1", "--master_port", str(h.free_port()), str(script)],
                           cwd=h.REPO, env=h.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    time.sleep(3)
    job.send_signal(signal.SIGUSR1)
    try:
        assert job.wait(timeout=30) == -signal.SIGUSR1
    finally:
        h.kill9_group(job)


def test_sigterm_to_torchrun_saves_and_exits():
    """torchrun forwards SIGTERM to its ranks, which save and exit; torchrun itself reports the signal."""
    rundir, log = h.BASE / "sigterm", h.BASE / "sigterm.log"
    cmd = h.train_cmd(2, rundir, h.prepared(), "--save-interval", "0", "--max-steps", "12", "--decay-steps", "4",
                      "--eval-interval", "0")
    job = h.start(cmd, log)
    h.wait_for(lambda: h.last_step(rundir) >= 3, 400, "step 3", job)
    step = stop_and_check(rundir, job, lambda j: j.send_signal(signal.SIGTERM), log, launcher_rc=1,
                          launcher_tracebacks=1)
    assert "SignalException: Process" in log.read_text() and 3 <= step < 12
