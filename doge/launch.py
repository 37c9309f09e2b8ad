"""`python -m doge.launch ...`: the `deepspeed` command, with stop signals that end a job cleanly.

DeepSpeed's launcher processes (the runner and the per-node `deepspeed.launcher.launch` it starts)
take SIGUSR1's default action and die: the ranks are orphaned and the job reports "killed by
signal" however cleanly they save. This front starts DeepSpeed's runner with SIGUSR1 ignored (an
ignored signal stays ignored across exec, so both launcher processes ignore it, while
doge/train.py installs its own handler) and turns SIGUSR1 or SIGTERM sent to it into SIGUSR1 for
every rank: the ranks finish the step, save a checkpoint and exit 0, then the launchers exit 0,
and so does this command. A signal delivered to the whole process group (a terminal, SLURM's
`scancel --signal=USR1`) ends the same way.

    python -m doge.launch [deepspeed flags] doge/train.py --deepspeed ds_configs/zero2.json ...

Every argument goes to `deepspeed` unchanged (its flags follow below with --help). Each rank is
sent the request once, as soon as its handler is installed (a rank still starting up ignores
SIGUSR1 until then, and one already past its Python shutdown would die of it). Multi-node: start
one launcher per node (e.g. under srun) and signal each; ranks reached through pdsh/ssh are out
of this process's reach.

The launcher's death takes its ranks with it: each rank watches this process (its pid and start
time travel in DOGE_LAUNCHER) and its own parent, and exits at once when either is gone, so a
SIGKILLed launcher never leaves ranks writing to RUNDIR (what they leave is what kill -9 leaves,
which a resume handles). So after a stop signal this process outlives the ranks it saw: SLURM's
SIGTERM reaches every process of the job step, DeepSpeed's runner may exit on it at once, and
leaving with it would end ranks that are still saving.

A run that is refused (a bad flag, recipe or data: rank 0's one `error: ...` line, exit 2) ends
with that line: DeepSpeed's launchers print their own lines after a rank's ("Killing subprocess",
"exits with return code = 2"), so rank 0 leaves it in a temporary file (DOGE_ERROR_FILE) instead
of printing it, and this command prints it once they are done, as its last line, and exits 2.
The bare `deepspeed` command cannot do that: there the error line is followed by the launcher's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil

from doge.training.launcher_watch import ERROR_ENV, LAUNCHER_ENV, POLL_S, launcher_id

STOP_WAIT_S = 120  # how long a stopped job's ranks may take to save after the runner is gone
RANK_PARENT = "deepspeed.launcher.launch"


def ranks(runner_pid: int) -> list[psutil.Process]:
    """The training processes: children of the per-node `deepspeed.launcher.launch` processes."""
    found = []
    try:
        for proc in psutil.Process(runner_pid).children(recursive=True):
            if any(RANK_PARENT in part for part in proc.cmdline()):
                found.extend(proc.children())
    except psutil.Error:  # a process ended while we looked: the next round sees the rest
        pass
    return found


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (the SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (sig - 1) & 1)


def forward_stop(runner_pid: int, told: set[int]) -> None:
    """SIGUSR1 once to every rank that handles it and has not been told yet."""
    for proc in ranks(runner_pid):
        if proc.pid not in told and catches(proc.pid, signal.SIGUSR1):
            try:
                proc.send_signal(signal.SIGUSR1)
                told.add(proc.pid)
            except psutil.Error:
                pass


def exit_status(returncode: int) -> int:
    """A child killed by signal N reports -N; shells report that as 128 + N."""
    return returncode if returncode >= 0 else 128 - returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__, flush=True)  # then DeepSpeed's own flags, printed by its runner
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the launcher processes
    # Named, not made: only a rank that fails creates it, so a SIGKILLed launcher leaves nothing behind.
    me = psutil.Process()
    error_file = os.path.join(tempfile.gettempdir(), f"doge-launch-{me.pid}-{int(me.create_time() * 1e6)}.error")
    try:
        returncode = run(argv, error_file)
    finally:
        try:
            with open(error_file) as fh:
                error = fh.read().strip()
            os.unlink(error_file)
        except FileNotFoundError:
            error = ""
    if error:  # rank 0's refusal, printed after the launchers' own lines
        print(error, file=sys.stderr, flush=True)
        return 2 if returncode != 0 else returncode
    return returncode


def run(argv: list[str], error_file: str) -> int:
    """DeepSpeed's runner on `argv`, stop signals forwarded to the ranks; its exit status."""
    runner = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", *argv],
                              env={**os.environ, LAUNCHER_ENV: launcher_id(psutil.Process()),
                                   ERROR_ENV: error_file})
    requests: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: requests.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: runner.send_signal(signal.SIGINT))
    told: set[int] | None = None
    seen: list[psutil.Process] = []
    while runner.poll() is None:
        seen = ranks(runner.pid) or seen
        if requests and told is None:
            print(f"doge.launch: {signal.Signals(requests[0]).name}: asking every rank to save and exit",
                  file=sys.stderr, flush=True)
            told = set()
        if told is not None:
            forward_stop(runner.pid, told)
        time.sleep(POLL_S)
    if requests:  # a signal to the whole job (SLURM) can end the runner while the ranks still save
        psutil.wait_procs(seen, timeout=STOP_WAIT_S)
    return exit_status(runner.returncode)


if __name__ == "__main__":
    sys.exit(main())
