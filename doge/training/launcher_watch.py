"""A rank never outlives its launcher.

A SIGKILLed launcher (`python -m doge.launch`, deepspeed's per-node launch, torchrun) would leave
its ranks running, writing to RUNDIR beside the next job. Each rank therefore watches the process
that started it and, under `doge.launch`, that launcher too: its pid and start time travel in
DOGE_LAUNCHER (the start time tells a reused pid apart). When either is gone the rank exits at
once; what it leaves is what kill -9 leaves, which a resume handles.

The other way, rank 0 leaves its `error: ...` line in the file DOGE_ERROR_FILE names
(`record_error`), so `doge.launch` ends with it.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import psutil

POLL_S = 0.2
LAUNCHER_ENV = "DOGE_LAUNCHER"  # "PID:START_TIME" of doge.launch, inherited by every rank
ERROR_ENV = "DOGE_ERROR_FILE"  # where rank 0 leaves its `error: ...` line for doge.launch to print last


def record_error(line: str) -> bool:
    """Rank 0's refusal, handed to `doge.launch` (True) instead of printed: DeepSpeed's launchers
    print their own lines ("Killing subprocess", "exits with return code") after a rank's, so the
    launcher prints it once they are done, as the job's last line. False: no `doge.launch` (or the
    file cannot be written), so the rank prints it itself."""
    path = os.environ.get(ERROR_ENV)
    if not path:
        return False
    try:  # a new file only (O_EXCL: never through a link or over someone else's file)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(line + "\n")
    return True


def launcher_id(proc: psutil.Process) -> str:
    """The DOGE_LAUNCHER value naming `proc`."""
    return f"{proc.pid}:{proc.create_time()}"


def _launcher(value: str) -> psutil.Process | None:
    """The process DOGE_LAUNCHER names, or None if it is gone (its pid reused or free)."""
    pid, started = value.split(":")
    try:
        proc = psutil.Process(int(pid))
        return proc if abs(proc.create_time() - float(started)) < 1e-3 else None
    except psutil.NoSuchProcess:
        return None


def _gone(proc: psutil.Process | None) -> bool:
    try:
        return proc is None or not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _watch(procs: list[psutil.Process | None]) -> None:
    while True:
        for proc in procs:
            if _gone(proc):
                print(f"error: the launcher (pid {proc.pid if proc else os.environ[LAUNCHER_ENV]}) is gone: rank "
                      f"{os.environ.get('RANK', '0')} stops now; resume with the same command", file=sys.stderr,
                      flush=True)
                os._exit(1)
        time.sleep(POLL_S)


def watch_launcher() -> None:
    """In a rank: a thread that ends this process at once when the launcher dies: `doge.launch`
    (from DOGE_LAUNCHER) or the process that started this rank (deepspeed's launch, torchrun)."""
    procs = [psutil.Process(os.getppid())] if "LOCAL_RANK" in os.environ else []
    if os.environ.get(LAUNCHER_ENV):
        procs.append(_launcher(os.environ[LAUNCHER_ENV]))
    if procs:
        threading.Thread(target=_watch, args=(procs,), daemon=True).start()
