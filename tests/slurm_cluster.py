"""A real SLURM cluster on this machine for the job-script tests: munge, slurmctld and two slurmd.

The two slurmd emulate nodes `node1` and `node2` (one host, own ports); each runs in a private mount
namespace whose /etc/hosts maps both names to 127.0.0.1, so jobs can use them as MASTER_ADDR. The
configuration lives in a scratch folder and reaches every daemon and client through SLURM_CONF, so
nothing under /etc/slurm is touched. Needs root (slurmd starts jobs as their user); installs the
Debian packages when missing. `stop()` ends every daemon this started, by its PID.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("node1", "node2")
# Short scheduler and credential intervals: a requeued job starts again after ~10 s instead of ~150 s.
CONF = """\
ClusterName=doge-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd.%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
NODE = "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=10000 State=UNKNOWN"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_missing() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    apt = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=apt,
                      capture_output=True).returncode:
        subprocess.run(["apt-get", "update"], env=apt, check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=apt, check=True,
                       capture_output=True)


def munge_works() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout,
                                                      capture_output=True).returncode == 0


def wait(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    def start(self) -> Cluster:
        install_missing()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root / "state", "slurm", "slurm")
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(NODE.format(name=name, host=host, port=free_port()) for name in NODES)
        (self.root / "slurm.conf").write_text(CONF.format(host=host, ctld_port=free_port(), root=self.root,
                                                          nodes=nodes))
        hosts = Path("/etc/hosts").read_text() + f"\n127.0.0.1 {' '.join(NODES)}\n"
        (self.root / "hosts").write_text(hosts)
        if not munge_works():  # a munged already running (another test session's) is reused, not ours to stop
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._daemon("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                                    "/usr/sbin/munged", "-F"])
            wait(munge_works, 30, "munged")
        self._daemon("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i"])
        for name in NODES:  # exec chain: the PID kept is slurmd's own
            self._daemon(f"slurmd.{name}", ["unshare", "-m", "--propagation", "private", "sh", "-c",
                                            f"mount --bind {self.root}/hosts /etc/hosts && "
                                            f"exec /usr/sbin/slurmd -D -N {name}"])
        wait(lambda: self.idle_nodes() == len(NODES), 60, "both nodes idle")
        return self

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def idle_nodes(self) -> int:
        for proc in self.procs:
            assert proc.poll() is None, f"{proc.args} exited {proc.returncode}: see {self.root}/log"
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
        return out.count("idle")

    def stop(self) -> None:
        """Cancel every job, SIGTERM each daemon by PID (slurmd first, SIGKILL after 20 s), then
        SIGKILL any job process they left (slurmstepd outlives slurmd): found by this cluster's SLURM_CONF."""
        self.run(["scancel", "--full", f"--user={os.getuid()}"], check=False)
        try:
            wait(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(), 30, "jobs to end", poll=1.0)
        except AssertionError:
            pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self) -> list[int]:
        """PIDs of live processes started with this cluster's SLURM_CONF (slurmstepd and the jobs)."""
        tag = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if tag in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True, **kwargs)
        assert not check or done.returncode == 0, f"{cmd} exited {done.returncode}: {done.stderr}"
        return done

    def sbatch(self, args: list[str], env: dict, cwd: Path) -> int:
        """Submit; the job id. `env` is the job's environment (sbatch exports it to the job)."""
        done = self.run(["sbatch", "--parsable", *args], env=dict(env, SLURM_CONF=self.env["SLURM_CONF"]), cwd=cwd)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_done(self, job_id: int | str, timeout: float) -> dict[str, str]:
        """Poll until the job is in a final state (not requeued, not pending, not running)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}

        def ended():
            info = self.job(job_id)
            return info if info.get("JobState") in final else None
        return wait(ended, timeout, f"job {job_id} to end", poll=1.0)
