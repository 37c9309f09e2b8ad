"""A run that cannot work stops before anything starts: one `error: ...` line naming the field and
the fix, exit code 2, no traceback, and no process group, on every launcher.

"No process group" is checked for real: the single-process runs are told they are rank 0 of a
2-rank job (WORLD_SIZE=2), so a rank that went on to create the process group would wait for a
rank 1 that never comes, and the test would time out.
"""
import sys

import pytest
import train_harness as h
import yaml

pytestmark = pytest.mark.slow
PG_STARTED = "Initializing TorchBackend"  # DeepSpeed's log line when it creates the process group


def lone_rank_of_two() -> dict:
    return dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(h.free_port()))


def unknown_key_recipe() -> str:
    path = h.BASE / "unknown-key.yaml"
    recipe = yaml.safe_load((h.REPO / "recipes" / "doge-tiny.yaml").read_text())
    path.write_text(yaml.safe_dump({**recipe, "learning_rate": 1e-3}))
    return str(path)


CASES = {
    "wsd-phases-exceed-max-steps": (lambda: ["--warmup-steps", "2400", "--decay-steps", "2400", "--max-steps", "20"],
                             "decay starts at step -2380, before warmup ends at 2400: lower --warmup-steps"),
    "precision-fp16": (lambda: ["--precision", "fp16"], "'fp16' is not allowed: choose one of auto, bf16, fp32"),
    "decay-shape-cosinus": (lambda: ["--decay-shape", "cosinus"],
                            "'cosinus' is not allowed: choose one of linear, 1-sqrt, cosine"),
    "unknown-recipe-key": (lambda: ["--recipe", unknown_key_recipe()], "unknown recipe key(s) ['learning_rate']"),
    "batch-vs-world": (lambda: ["--global-batch-tokens", str(12 * h.SEQ_LEN)],
                       "global batch of 12 samples is not divisible by --micro-batch-size 4 x world size 2"),
    "negative-lr": (lambda: ["--lr=-1e-3"], "--lr (recipe key lr) = -0.001: must be >= 0.0"),
    "bad-ds-config": (lambda: ["--deepspeed", "/nonexistent/ds.json"], "--deepspeed /nonexistent/ds.json"),
}


def assert_one_clean_line(done, message):
    assert message in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and PG_STARTED not in done.stdout + done.stderr


def test_first_try_of_the_160m_recipe_is_one_line():
    """The published doge-160m recipe as a new user first tries it, with only --max-steps changed."""
    rundir = h.BASE / "preflight-160m"
    cmd = [sys.executable, "doge/train.py", "--deepspeed", "ds_configs/zero2.json", "--recipe",
           "recipes/doge-160m.yaml", "--data", str(h.prepared()), "--output", str(rundir), "--max-steps", "20"]
    done = h.run(cmd, expect_rc=2, timeout=120, **lone_rank_of_two())
    assert_one_clean_line(done, "decay starts at step -2380, before warmup ends at 2400: lower --warmup-steps")
    assert not rundir.exists()


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_before_any_process_group(case):
    flags, message = CASES[case]
    rundir = h.BASE / f"preflight-{case}"
    cmd = h.train_cmd(1, rundir, h.prepared(), *flags())
    done = h.run(cmd, expect_rc=2, timeout=120, **lone_rank_of_two())
    assert_one_clean_line(done, message)
    assert not rundir.exists(), "nothing is written for a run that cannot start"


@pytest.mark.parametrize("launcher", ["deepspeed", "doge.launch"])
def test_launchers_report_one_line_and_exit_2(launcher):
    flags, message = CASES["batch-vs-world"]
    cmd = h.train_cmd(2, h.BASE / f"preflight-{launcher}", h.prepared(), *flags(), launcher="deepspeed")
    if launcher == "doge.launch":
        cmd = [sys.executable, "-m", "doge.launch", *cmd[1:]]
    done = h.run(cmd, expect_rc=2, timeout=300)
    assert_one_clean_line(done, message)


def test_torchrun_reports_one_line():
    """torchrun turns any failed rank into its own ChildFailedError summary and exit code 1; our
    ranks still stop before the process group with one error line (rank 0's)."""
    flags, message = CASES["precision-fp16"]
    done = h.run(h.train_cmd(2, h.BASE / "preflight-torchrun", h.prepared(), *flags()), expect_rc=1, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert PG_STARTED not in done.stdout + done.stderr and 'File "' + str(h.REPO / "doge") not in done.stderr
