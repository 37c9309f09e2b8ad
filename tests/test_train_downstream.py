"""Benchmark scores during training (--downstream-interval): a step's in-loop scores equal
`python -m doge.evaluate` on the export of that step's checkpoint (same tasks, items and shots),
under ZeRO-3 (partitioned parameters, gathered by every rank) and under expert parallelism (ZeRO-2,
a CDMoE model whose expert tables are split over 2 ranks); a run with them on trains exactly as
the run with them off (losses, weights, RNG streams); bad task names stop the run before it starts.

Runs are 3 steps with scores every 2: at step 2 (the interval) and step 3 (the last step)."""
from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import train_harness as h
from conftest import ASSETS
from test_train_expert_parallel import moe_recipe
from test_train_preflight import assert_one_clean_line, lone_rank_of_two

EVAL = ASSETS / "eval"
TASKS = "arc_easy_local,winogrande_local"  # acc and acc_norm; WinoGrande's partial scoring
LIMIT = 10
SHORT = ["--max-steps", "3", "--warmup-steps", "1", "--decay-steps", "1", "--save-interval", "2",
         "--eval-interval", "0", "--export", "false"]
SCORED = ["--downstream-interval", "2", "--downstream-tasks", TASKS, "--downstream-limit", str(LIMIT)]
TIMING = {"time", "tokens_per_s", "mfu", "eta_s", "peak_memory_gb", "downstream/seconds"}  # wall-clock values


def train(name: str, *extra: str, zero: str = "zero2") -> tuple[h.Path, str]:
    """A 2-rank run of SHORT; its folder and console output."""
    rundir = h.BASE / f"downstream-{name}"
    done = h.run(h.train_cmd(2, rundir, h.prepared(), *SHORT, *extra, zero=zero), DOGE_EVAL_DATA=str(EVAL))
    return rundir, done.stdout + done.stderr


def in_loop(rundir: h.Path) -> dict[int, dict]:
    """Step -> the downstream scores metrics.jsonl holds for it."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("downstream/") and k not in TIMING}
            for r in h.metrics(rundir) if "downstream/seconds" in r}


def evaluated(checkpoint: h.Path) -> dict:
    """`python -m doge.export` of the checkpoint, then `python -m doge.evaluate` on it with the run's
    tasks, items and (default) shots; its scores under the keys the trainer logs."""
    export, out = checkpoint.parent.parent / f"export-{checkpoint.name}", checkpoint.parent.parent / "eval"
    h.run([sys.executable, "-m", "doge.export", str(checkpoint), str(export)])
    h.run([sys.executable, "-m", "doge.evaluate", "--model", str(export), "--tasks", TASKS, "--limit", str(LIMIT),
           "--output", str(out), "--data", str(EVAL)])
    results = json.loads((out / "results.json").read_text())["results"]
    assert all(results[task]["sample_len"] == LIMIT for task in TASKS.split(","))
    return {f"downstream/{task}/{key.split(',')[0]}": value for task in TASKS.split(",")
            for key, value in results[task].items() if key.endswith(",none") and "_stderr" not in key}


def assert_scores_equal_doge_evaluate(rundir: h.Path, console: str, step: int) -> None:
    scores = in_loop(rundir)
    assert sorted(scores) == [2, 3], scores  # every 2 steps, and at the last
    expected = evaluated(rundir / "checkpoints" / f"step-{step:08d}")
    assert set(expected) == {f"downstream/{t}/{m}" for t, m in (("arc_easy_local", "acc"),
                                                                 ("arc_easy_local", "acc_norm"),
                                                                 ("winogrande_local", "acc"))}
    assert scores[step] == pytest.approx(expected, abs=1e-6, rel=0)
    assert f"step      {step}/3 | downstream/arc_easy_local/acc " in console  # the console line


def rng_streams(checkpoint: h.Path, rank: int) -> dict:
    with open(checkpoint / "rng" / f"rank-{rank:05d}.pkl", "rb") as fh:
        return pickle.load(fh)


def assert_same_training(on: h.Path, off: h.Path) -> None:
    """Same losses, norms and counters at every step, same weights and RNG streams on every rank.
    Python's and numpy's streams start from fresh entropy in each process, so they are compared
    within a run: training draws nothing from them, so at step 3 they are still those saved at
    step 2 (before that step's scoring), in the run with scores as in the run without."""
    from doge.training.weights import checkpoint_weights

    lines = [{s: {k: v for k, v in line.items() if k not in TIMING} for s, line in h.train_lines(run).items()}
             for run in (on, off)]
    assert sorted(lines[0]) == [1, 2, 3] and lines[0] == lines[1]
    h.assert_bit_identical(*(checkpoint_weights(run / "checkpoints" / "step-00000003") for run in (on, off)))
    for rank in (0, 1):
        (on2, on3), (off2, off3) = ([rng_streams(run / "checkpoints" / f"step-0000000{step}", rank) for step in (2, 3)]
                                    for run in (on, off))
        assert on3["torch"].equal(off3["torch"])
        for step2, step3 in ((on2, on3), (off2, off3)):
            assert step3["python"] == step2["python"]
            assert all(np.array_equal(x, y) for x, y in zip(step3["numpy"], step2["numpy"]))


@pytest.mark.slow
def test_zero3_scores_equal_doge_evaluate_and_training_is_unchanged():
    """ZeRO-3 partitions every parameter: each rank gathers them for the scoring forwards."""
    on, console = train("zero3-on", *SCORED, zero="zero3")
    assert_scores_equal_doge_evaluate(on, console, 2)
    off, _ = train("zero3-off", zero="zero3")
    assert not in_loop(off)
    assert_same_training(on, off)


@pytest.mark.slow
def test_expert_parallel_scores_equal_doge_evaluate():
    """ZeRO-2 with each CDMoE layer's expert tables split over the 2 ranks: the scoring forwards
    exchange tokens within the expert group; the export holds the tables whole."""
    on, console = train("ep", *SCORED, "--recipe", moe_recipe(), "--expert-parallel-size", "2")
    assert_scores_equal_doge_evaluate(on, console, 3)


def test_a_bad_task_name_stops_the_run_before_it_starts():
    """doge.evaluate's checks, naming the training flag: one error line, no process group, no RUNDIR."""
    rundir = h.BASE / "downstream-refused"
    done = h.run(h.train_cmd(1, rundir, h.prepared(), "--downstream-interval", "2", "--downstream-tasks",
                             "arc_easy_locl"), expect_rc=2, timeout=120, DOGE_EVAL_DATA=str(EVAL), **lone_rank_of_two())
    assert_one_clean_line(done, "error: --downstream-tasks arc_easy_locl: no such task; did you mean arc_easy_local")
    assert not rundir.exists()
