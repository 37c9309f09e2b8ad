"""The loss-spike guard (--spike-sigma): a step whose loss is far above the recent ones is skipped
(weights, Adam moments and step count untouched, its batch still consumed), counted and logged;
--spike-max-skips in a row stop the run; its state survives kill -9 and resume bit for bit. The
spikes are real: DOGE_FAULT_SPIKE_STEPS multiplies those steps' loss by 50, and a run without the
guard trains on them."""
import functools
import json
import random
import re
import statistics

import pytest
import torch
import train_harness as h

from doge.training.recipe import ConfigError, PretrainRecipe

SPIKES = "7,8,10"
# --decay-start: the shorter unguarded run follows the same LR schedule
GUARDED = ["--max-steps", "12", "--warmup-steps", "2", "--decay-steps", "2", "--decay-start", "10",
           "--save-interval", "2", "--eval-interval", "0", "--export", "false", "--spike-sigma", "6",
           "--spike-window", "4"]
LOGGED = ("loss", "grad_norm", "lr", "samples_consumed", "tokens_seen", "skipped_steps", "skipped_spikes")
SPIKE_LINE = re.compile(r"step (\d+): loss spike ([\d.]+) > mean ([\d.]+) \+ 6 x std ([\d.]+) of the recent steps, "
                        r"update skipped \((\d) in a row\)")


def guarded_cmd(rundir, *extra):
    return h.train_cmd(2, rundir, h.prepared(), *GUARDED, *extra)


@functools.lru_cache(maxsize=None)
def guarded_run():
    """2 ranks, ZeRO-2, fp32, spikes injected at steps 7, 8 and 10, uninterrupted: (rundir, stdout)."""
    rundir = h.BASE / "spikes-guarded"
    return rundir, h.run(guarded_cmd(rundir, "--wandb", "offline"), DOGE_FAULT_SPIKE_STEPS=SPIKES).stdout


def checkpoint(rundir, step):
    return rundir / "checkpoints" / f"step-{step:08d}"


def engine_state(ckpt) -> dict:
    """Every tensor a resume loads: the module's weights, and per ZeRO shard the fp32 master
    weights and the Adam moments and step counts."""
    out = {f"module.{k}": v for k, v in
           torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"].items()}
    for shard in sorted(ckpt.glob("*_optim_states.pt")):
        state = torch.load(shard, weights_only=False)["optimizer_state_dict"]
        out.update({f"{shard.name}.fp32.{i}": t for i, t in enumerate(state["single_partition_of_fp32_groups"])})
        out.update({f"{shard.name}.{p}.{k}": v for p, moments in state["base_optimizer_state"]["state"].items()
                    for k, v in moments.items()})
    return out


def adam_steps(ckpt) -> set[int]:
    return {int(v) for k, v in engine_state(ckpt).items() if k.endswith(".step")}


def trainer_state(ckpt) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def logged(rundir) -> dict[int, dict]:
    return {step: {k: line.get(k) for k in LOGGED} for step, line in h.train_lines(rundir).items()}


@pytest.mark.slow
def test_spikes_are_skipped_counted_and_logged_and_change_nothing():
    rundir, stdout = guarded_run()
    lines = h.train_lines(rundir)
    spikes = {int(m[0]): m[1:] for m in SPIKE_LINE.findall(stdout)}
    assert sorted(spikes) == [7, 8, 10] and [spikes[s][3] for s in (7, 8, 10)] == ["1", "2", "1"], stdout[-3000:]
    loss, mean, std = (float(x) for x in spikes[7][:3])
    window = [lines[s]["loss"] for s in range(3, 7)]  # the last 4 applied steps before step 7
    assert mean == pytest.approx(statistics.mean(window), abs=1e-4)
    assert std == pytest.approx(statistics.stdev(window), abs=1e-4) and loss > mean + 6 * std
    assert loss == pytest.approx(50 * lines[6]["loss"], rel=0.1)
    assert [lines[s]["skipped_spikes"] for s in range(1, 13)] == [0] * 6 + [1, 2, 2, 3, 3, 3]
    assert [lines[s]["loss"] is None for s in range(1, 13)] == [False] * 6 + [True, True, False, True, False, False]
    assert all(lines[s]["samples_consumed"] == 16 * s and lines[s]["skipped_steps"] == 0 for s in range(1, 13))

    at6, at8, at10 = (engine_state(checkpoint(rundir, s)) for s in (6, 8, 10))
    h.assert_bit_identical(at6, at8)  # steps 7 and 8: weights, master weights, moments, step counts
    assert any(not torch.equal(at8[k], at10[k]) for k in at8)  # step 9 trained
    assert adam_steps(checkpoint(rundir, 12)) == {9}
    state = trainer_state(checkpoint(rundir, 8))
    assert (state["spikes_in_row"], state["skipped_spikes"], state["samples_consumed"]) == (2, 2, 128)
    final = trainer_state(checkpoint(rundir, 12))
    assert (final["spikes_in_row"], final["skipped_spikes"]) == (0, 3)
    assert final["recent_losses"] == pytest.approx([lines[s]["loss"] for s in (6, 9, 11, 12)], rel=1e-6)
    logged_to_wandb = b"".join(p.read_bytes() for p in (rundir / "wandb").glob("offline-run-*/*.wandb"))
    assert b"skipped_spikes" in logged_to_wandb
    assert json.loads((rundir / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_without_the_guard_the_spike_is_trained_on():
    """Same run, guard off, to step 7: the spike is real and applied; until it, the guard changed no number."""
    guarded, _ = guarded_run()
    rundir = h.BASE / "spikes-unguarded"
    done = h.run(h.train_cmd(2, rundir, h.prepared(), *GUARDED, "--spike-sigma", "0", "--max-steps", "7",
                             "--save-interval", "0"), DOGE_FAULT_SPIKE_STEPS=SPIKES)
    lines = h.train_lines(rundir)
    assert "loss spike" not in done.stdout and "skipped_spikes" not in lines[7]
    assert lines[7]["loss"] > 20 * lines[6]["loss"] and lines[7]["grad_norm"] > 20 * lines[6]["grad_norm"]
    assert adam_steps(checkpoint(rundir, 7)) == {7}
    theirs = logged(guarded)
    for step, line in logged(rundir).items():
        if step < 7:
            assert line == {**theirs[step], "skipped_spikes": None}, step


@pytest.mark.slow
def test_spikes_in_a_row_stop_the_run_and_a_guarded_step_never_waits(tmp_path):
    """bf16 (the device-side skip of `guard_on_device`), one rank: spikes at 5, 6, 7 with
    --spike-max-skips 3 stop the run at the step-7 read; step 4 is profiled for host reads."""
    rundir = tmp_path / "run"
    done = h.run(h.train_cmd(1, rundir, h.prepared(), *GUARDED, "--max-steps", "7", "--spike-max-skips", "3",
                             "--precision", "bf16", "--log-interval", "10"),
                 expect_rc=1, DOGE_FAULT_SPIKE_STEPS="5,6,7", DOGE_FAULT_SYNC_PROBE="4")
    assert ("RuntimeError: 3 loss spikes in a row (--spike-max-skips 3, --spike-sigma 6, --spike-window 4): lower "
            f"--lr, raise --warmup-steps, check the data or raise --spike-sigma; the last checkpoint, "
            f"{checkpoint(rundir, 6)}, holds weights from before them") in done.stderr, done.stderr[-3000:]
    assert "(3 in a row)" in done.stdout and (rundir / "checkpoints" / "latest").read_text() == "step-00000006\n"
    h.assert_bit_identical(engine_state(checkpoint(rundir, 4)), engine_state(checkpoint(rundir, 6)))
    assert json.loads((rundir / "status.json").read_text())["state"] == "failed"
    probe = json.loads((rundir / "sync-probe" / "rank-0.json").read_text())
    assert probe["operations"] > 1000 and probe["syncs"] == {}, probe


@pytest.mark.slow
def test_kill9_with_spikes_resumes_bit_identical():
    """Killed mid-step or mid-save after the spikes at 7 and 8 (checkpoints every 2 steps): the
    resumed run must restore the window, the streak and the count to judge step 10 alike."""
    reference, _ = guarded_run()
    step, point = random.choice([(s, "step") for s in range(9, 13)] + [(10, "save-state"), (10, "save-manifest")])
    rundir = h.BASE / "spikes-killed"
    log = h.BASE / "spikes-killed.log"
    job = h.start(guarded_cmd(rundir), log, DOGE_FAULT_SPIKE_STEPS=SPIKES, DOGE_FAULT_PAUSE=f"{point}:{step}")
    h.wait_for(lambda: f"fault pause: {point} step {step}" in log.read_text(), 400, f"{point} at step {step}", job)
    h.kill9_group(job)
    done = h.run(guarded_cmd(rundir), DOGE_FAULT_SPIKE_STEPS=SPIKES)
    assert "resumed from" in done.stdout, f"{point} at step {step}"
    h.assert_bit_identical(engine_state(checkpoint(reference, 12)), engine_state(checkpoint(rundir, 12)))
    assert logged(rundir) == logged(reference), f"{point} at step {step}"
    ours, theirs = trainer_state(checkpoint(rundir, 12)), trainer_state(checkpoint(reference, 12))
    for key in ("spikes_in_row", "skipped_spikes", "recent_losses", "samples_consumed"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("flag, value, message", [
    ("spike_sigma", -1.0, "--spike-sigma (recipe key spike_sigma) = -1.0: must be >= 0.0"),
    ("spike_window", 1, "--spike-window (recipe key spike_window) = 1: must be >= 2"),
    ("spike_max_skips", 0, "--spike-max-skips (recipe key spike_max_skips) = 0: must be >= 1"),
])
def test_the_recipe_refuses_bad_guard_values(flag, value, message):
    """A ConfigError is what the command line prints as its one `error: ...` line (exit 2)."""
    with pytest.raises(ConfigError) as err:
        PretrainRecipe.load(None, {flag: value})
    assert str(err.value) == message
