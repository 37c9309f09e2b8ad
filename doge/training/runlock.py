"""One job per RUNDIR: `RUNDIR/run.lock`, held by rank 0 of the running job.

The lock is a small JSON file (host, pid, the process's start time, SLURM job id and restart
count) created with `link()`, which fails if the name exists, on local disks and NFS alike. While
the job runs, a thread touches the file every HEARTBEAT_S seconds. A lock is stale, reported and
taken over, when its holder is surely gone:

- same host: no process with that pid and start time (kill -9, a crash, a reboot);
- same SLURM job id with another restart count: an earlier run of this requeued job (SLURM
  starts the requeued run only after the old one ended, possibly on another node);
- another host: no heartbeat for STALE_S seconds (that node died or lost the file system).

Any other holder is alive, and the new job stops with one line naming it (exit 2).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import psutil

from doge.training.recipe import ConfigError

LOCK_FILE = "run.lock"
HEARTBEAT_S, STALE_S = 30.0, 300.0


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}


def _alive_here(holder: dict) -> bool:
    try:
        return abs(psutil.Process(holder["pid"]).create_time() - holder["started"]) < 1.0
    except (psutil.Error, KeyError, TypeError):
        return False


def stale_reason(holder: dict, age_s: float) -> str | None:
    """Why the lock `holder` (heartbeat `age_s` seconds ago) is dead, or None if it may be running."""
    me = _me()
    if holder.get("host") == me["host"]:
        return None if _alive_here(holder) else f"process {holder.get('pid')} is gone"
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        if holder.get("slurm_restart") != me["slurm_restart"]:
            return f"it is an earlier run of SLURM job {me['slurm_job']} (requeued)"
    if age_s > STALE_S:
        return f"its heartbeat stopped {age_s:.0f} s ago"
    return None


def _read(lock: Path) -> tuple[dict, float] | None:
    """(holder, seconds since its heartbeat), or None if there is no lock."""
    try:
        age = time.time() - lock.stat().st_mtime
        return json.loads(lock.read_text() or "{}"), age
    except FileNotFoundError:
        return None
    except ValueError:  # a holder killed between link and write is impossible; an edited file is not ours
        return {}, age


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}"


def check(rundir: Path) -> str | None:
    """Raise ConfigError if a live job holds RUNDIR's lock; else a note on a stale lock (or None)."""
    lock = Path(rundir) / LOCK_FILE
    found = _read(lock)
    if found is None:
        return None
    holder, age = found
    reason = stale_reason(holder, age)
    if reason is None:
        raise ConfigError(f"--output {rundir} is in use by another job ({_describe(holder)}, heartbeat {age:.0f} s "
                          f"ago; {lock}): wait for it to end or stop it; if it is surely dead, delete {lock}")
    return f"took over the stale lock {lock} of {_describe(holder)}: {reason}"


def acquire(rundir: Path) -> str | None:
    """Take RUNDIR's lock (creating RUNDIR); returns the stale-lock note, if any. Raises ConfigError
    if a live job holds it, or if another job took it in the meantime."""
    rundir = Path(rundir)
    rundir.mkdir(parents=True, exist_ok=True)
    note = check(rundir)
    lock = rundir / LOCK_FILE
    if note:
        try:
            os.rename(lock, lock.with_name(f".stale-{LOCK_FILE}-{os.getpid()}"))  # only one newcomer wins
        except FileNotFoundError:
            pass
        lock.with_name(f".stale-{LOCK_FILE}-{os.getpid()}").unlink(missing_ok=True)
    mine = lock.with_name(f".tmp-{LOCK_FILE}-{os.getpid()}")
    mine.write_text(json.dumps(_me()))
    try:
        os.link(mine, lock)
    except FileExistsError:
        check(rundir)  # raises, naming the job that came first
        raise ConfigError(f"--output {rundir}: another job took {lock} at the same time; retry") from None
    finally:
        mine.unlink()
    threading.Thread(target=_heartbeat, args=(lock,), daemon=True).start()
    return note


def _heartbeat(lock: Path) -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        try:
            os.utime(lock)
        except OSError:
            return


def release(rundir: Path) -> None:
    """Remove the lock if this process holds it."""
    lock = Path(rundir) / LOCK_FILE
    found = _read(lock)
    if found and found[0].get("pid") == os.getpid() and found[0].get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
