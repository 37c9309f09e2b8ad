"""Shared plumbing for the trainer tests: real data (tests/assets) prepared once per session, real launchers.

Everything here starts real processes (data_tools CLIs, `deepspeed`/`torchrun`/`python` on
doge/train.py with 2 gloo ranks on CPU); nothing is mocked. Expensive results (prepared data,
the uninterrupted reference run) are memoised so the suite pays for them once.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import ASSETS

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = ASSETS / "pretrain"
BASE = Path(os.environ.get("DOGE_TEST_TMP", "/tmp")) / f"doge-train-tests-{os.getpid()}"

SEQ_LEN, GLOBAL_SAMPLES = 64, 16
# A complete tiny run: 24 steps of 16 x 64 tokens, checkpoints every 8, WSD 4 / 12 / 8.
TINY = ["--recipe", "recipes/doge-tiny.yaml", "--seq-len", str(SEQ_LEN), "--micro-batch-size", "4",
        "--global-batch-tokens", str(SEQ_LEN * GLOBAL_SAMPLES), "--max-steps", "24", "--warmup-steps", "4",
        "--decay-steps", "8", "--lr", "3e-3", "--save-interval", "8", "--log-interval", "1",
        "--eval-interval", "12", "--eval-samples", "16", "--precision", "fp32", "--wandb", "off", "--keep-last", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(**extra) -> dict:
    out = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), MASTER_PORT=str(free_port()),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_API_KEY", "RANK", "WORLD_SIZE",
                "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        out.pop(key, None)
    out.update(extra)
    return out


def train_cmd(world: int, rundir: Path, data: Path, *extra: str, zero: str = "zero2",
              launcher: str = "torchrun") -> list[str]:
    """`deepspeed`/`torchrun` for 2 ranks, plain `python` for one."""
    script = ["doge/train.py", "--deepspeed", f"ds_configs/{zero}.json", "--data", str(data),
              "--output", str(rundir), *TINY, *extra]
    if world == 1:
        return [sys.executable, *script]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(world), "--master_port", str(free_port()), *script]
    return ["torchrun", "--standalone", "--nproc_per_node", str(world), *script]


def run(cmd: list[str], expect_rc: int = 0, timeout: float = 600, **env_extra) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect_rc, (f"{' '.join(cmd)} exited {done.returncode}, expected {expect_rc}\n"
                                          f"--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}")
    return done


def start(cmd: list[str], log: Path, **env_extra) -> subprocess.Popen:
    """Background job in its own process group, so a test can signal or kill -9 all of it."""
    return subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill9_group(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every rank, and wait until none is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive(proc.pid)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited {proc.returncode} while waiting for {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metrics(rundir: Path) -> list[dict]:
    path = Path(rundir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_lines(rundir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(rundir) if "loss" in r}


def last_step(rundir: Path) -> int:
    lines = train_lines(rundir)
    return max(lines) if lines else 0


def final_weights(rundir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(rundir) / "final" / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name]), f"{name} differs"


def tree_digest(root: Path) -> dict[str, tuple]:
    """Path -> (size, mtime_ns, sha256) of every file under root: detects any byte or metadata change."""
    import hashlib

    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _make_base() -> None:
    """Session scratch folder, removed at exit unless DOGE_KEEP_TEST_RUNS is set (for debugging)."""
    BASE.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("DOGE_KEEP_TEST_RUNS"):
        atexit.register(shutil.rmtree, BASE, True)


@functools.lru_cache(maxsize=None)
def tokenizer() -> Path:
    _make_base()
    out = BASE / "tokenizer"
    run([sys.executable, "data_tools/train_tokenizer.py", "--input", str(PRETRAIN / "tinyshakespeare.txt"),
         str(PRETRAIN / "hh_helpful_dialogues.txt"), "--vocab-size", "1024", "--output", str(out)])
    return out


@functools.lru_cache(maxsize=None)
def prepared(corpus: str = "tinyshakespeare.txt") -> Path:
    """A DATADIR of 64-token rows over one corpus of tests/assets/pretrain, tokenised with the session's
    tokenizer; 1 row in 20 held out (tinyshakespeare.txt: ~890 rows, ~45 held out, more than --eval-samples)."""
    out = BASE / f"data-{corpus}"
    run([sys.executable, "data_tools/prepare.py", "--input", str(PRETRAIN / corpus), "--tokenizer",
         str(tokenizer()), "--seq-len", str(SEQ_LEN), "--output", str(out), "--val-fraction", "0.05",
         "--val-rows", "64", "--workers", "1"])
    return out


@functools.lru_cache(maxsize=None)
def reference_run() -> Path:
    """The uninterrupted 2-rank ZeRO-2 run every resume test compares against."""
    rundir = BASE / "reference"
    run(train_cmd(2, rundir, prepared()))
    return rundir
