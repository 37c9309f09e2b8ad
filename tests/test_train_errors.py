"""Guards: config errors stop a real trainer process before the first step, with exit 2 and a
message naming the field and the fix, and leave the run folder untouched."""
import pytest

import train_harness as h

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-tokens", "1000"], "--global-batch-tokens 1000 is not a multiple of --seq-len 64"),
    (["--seq-len", "128"], "--seq-len 128 exceeds the data's seq_len 64"),
    (["--data", "/nonexistent/datadir"], "--data /nonexistent/datadir"),
    (["--resume", "never"], "--resume is never"),
])
def test_config_error_names_field_and_fix(flags, message):
    rundir = h.reference_run()
    before = h.tree_digest(rundir)
    cmd = h.train_cmd(1, rundir, h.prepared(), *flags)
    done = h.run(cmd, expect_rc=2, timeout=300)
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert h.tree_digest(rundir) == before
