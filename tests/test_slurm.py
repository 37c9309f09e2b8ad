"""The slurm/ job scripts on a real SLURM cluster (one controller, two emulated nodes on this host,
see slurm_cluster.py), with the tiny preset on CPU: multi-node training, time-limit and external
requeues that resume bit-identically, errors that never requeue, the restart cap, continuing a run,
and the refusal of rank-less multi-task launches. Needs root (the daemons)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import slurm_cluster
import train_harness as h

pytestmark = pytest.mark.slow

STEPS = 144  # ~90 s on an idle 2-core machine
EXTRA = " ".join(h.TINY[2:]) + f" --max-steps {STEPS}"  # the tiny run (recipe in RECIPE); decay after step 136
TINY_RECIPE = "recipes/doge-tiny.yaml"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster runs its daemons as root")
    h.prepared()  # before any job: data and tokenizer exist once
    h._make_base()
    cluster = slurm_cluster.Cluster(h.BASE / "slurm")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def submit(cluster, script, name, *sbatch_flags, nodes=2, **settings) -> int:
    """sbatch a slurm/ script with test overrides: CPU nodes, 1 core per node, 10 minutes with the
    time-limit warning 10 s before the end (so: none), log BASE/name.log; flags given here come last and win."""
    log = h.BASE / f"{name}.log"
    env = h.env(**{"RECIPE": TINY_RECIPE, "EXTRA": EXTRA, "RUN_DIR": str(h.BASE / name), **settings})
    return cluster.sbatch([f"--job-name={name}", f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1",
                           "--time=10", "--signal=B:USR1@10", f"--output={log}", f"--error={log}", *sbatch_flags,
                           script], env, h.REPO)


def log_of(name) -> str:
    path = h.BASE / f"{name}.log"
    return path.read_text() if path.is_file() else ""


def runs_in_log(name) -> int:
    return len(re.findall(r"doge-slurm \[.*\] job \d+ run \d+ on", log_of(name)))


def last_line(name) -> str:
    return log_of(name).rstrip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference_job(cluster):
    """Acceptance run and reference: 2 nodes x 1 rank, uninterrupted."""
    started = time.time()
    job = submit(cluster, "slurm/pretrain_20m.sh", "two-nodes", DATA=str(h.prepared()))
    info = cluster.wait_done(job, 600)
    print(f"2-node tiny job: {time.time() - started:.0f} s from sbatch to the end")
    return job, info


def test_two_nodes_train_as_one_job_and_export(reference_job):
    job, info = reference_job
    text = log_of("two-nodes")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text[-3000:]
    assert "doge-slurm: node 0 is node1" in text and "doge-slurm: node 1 is node2" in text
    assert text.count("fresh start at step 0") == 1 and "world 2," in text, "one process group of 2 ranks"
    assert sorted(h.train_lines(h.BASE / "two-nodes")) == list(range(1, STEPS + 1))
    assert (h.BASE / "two-nodes" / "final" / "model.safetensors").is_file()
    assert f"finished at step {STEPS}" in last_line("two-nodes")


@pytest.mark.timeout(1800)
def test_time_limit_saves_requeues_resumes_bit_identical(cluster, reference_job):
    """3-minute limit, warning 40 s before it: slurmctld checks limits every 30 s and sends it up to 30 s
    early, so 110-140 s after the start, well past the ranks' start-up (25-35 s at load 5 on 2 cores).
    Steps of at least 1.25 s (DOGE_FAULT_STEP_SECONDS: a sleep, numbers unchanged) make 180+ s of
    training, longer than any run until its warning however fast the machine: every run saves on the
    warning and requeues itself until the run is done (2-3 runs, ~5 minutes)."""
    name = "time-limit"
    started = time.time()
    job = submit(cluster, "slurm/pretrain_20m.sh", name, "--time=3", "--signal=B:USR1@40",
                 DATA=str(h.prepared()), MAX_RESTARTS="30", DOGE_FAULT_STEP_SECONDS="1.25")
    info = cluster.wait_done(job, 1500)
    print(f"time-limit job: {time.time() - started:.0f} s, {info['Restarts']} requeues")
    text = log_of(name)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, text[-3000:]
    assert "DUE TO TIME LIMIT" not in text, "the time limit killed a run before it saved"
    # a save after every warning that came before the training ended (the last run's may come later)
    assert text.count("(stop signal)") == text.count("requeueing (restart") == int(info["Restarts"])
    assert text.count("resumed from") == int(info["Restarts"]) == runs_in_log(name) - 1
    assert f"finished at step {STEPS}" in last_line(name)
    h.assert_bit_identical(h.final_weights(h.BASE / name), h.final_weights(h.BASE / "two-nodes"))


def test_requeue_from_outside_resumes_bit_identical(cluster, reference_job):
    name = "outside-requeue"
    job = submit(cluster, "slurm/pretrain_20m.sh", name, DATA=str(h.prepared()))
    h.wait_for(lambda: h.last_step(h.BASE / name) >= 4, 300, "step 4", poll=0.5)
    cluster.run(["scontrol", "requeue", str(job)])
    info = cluster.wait_done(job, 600)
    text = log_of(name)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "resumed from" in text and f"finished at step {STEPS}" in last_line(name)
    h.assert_bit_identical(h.final_weights(h.BASE / name), h.final_weights(h.BASE / "two-nodes"))


def test_real_errors_end_with_the_reason_and_never_requeue(cluster):
    """Missing data and a bad recipe value, each with a time-limit warning armed: FAILED, no requeue,
    no RUN_DIR left."""
    jobs = {"missing-data": submit(cluster, "slurm/pretrain_20m.sh", "missing-data", nodes=1,
                                   DATA=str(h.BASE / "no-such-data")),
            "bad-recipe": submit(cluster, "slurm/pretrain_20m.sh", "bad-recipe", nodes=1, DATA=str(h.prepared()),
                                 EXTRA=EXTRA + " --warmup-steps 10000")}
    for name, job in jobs.items():
        info = cluster.wait_done(job, 300)
        text = log_of(name)
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "2:0", text[-3000:]
        assert "error: " in text and "Traceback" not in text
        assert re.search(r"failed \(exit 2\): .+; not requeued$", last_line(name)), last_line(name)
        assert not (h.BASE / name).exists(), "a refused run left its RUN_DIR (the hostfile) behind"
    assert "no-such-data" in log_of("missing-data") and "warmup" in log_of("bad-recipe")


def test_restarts_stop_at_the_maximum(cluster):
    """Preempted again and again (the warning signal in every run): requeued twice, then it stops."""
    name = "preempted"
    job = submit(cluster, "slurm/pretrain_20m.sh", name, DATA=str(h.prepared()), MAX_RESTARTS="2",
                 EXTRA=EXTRA + " --max-steps 100000 --decay-steps 8 --save-interval 0")
    saved = 0
    for run in (1, 2, 3):  # each run signalled once it trains (past the step the last one saved)
        h.wait_for(lambda: runs_in_log(name) == run and h.last_step(h.BASE / name) > saved, 300,
                   f"run {run} training", poll=0.5)
        cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
        stops = h.wait_for(lambda: re.findall(r"stopped at step (\d+)", log_of(name))[run - 1:], 300,
                           f"run {run} saving", poll=0.5)
        saved = int(stops[0])
    info = cluster.wait_done(job, 300)
    text = log_of(name)
    assert info["Restarts"] == "2" and info["JobState"] == "FAILED", text[-3000:]
    assert "MAX_RESTARTS=2" in last_line(name) and "not requeued" in last_line(name)
    assert runs_in_log(name) == 3


def test_continue_from_a_stable_checkpoint_leaves_the_source_unchanged(cluster, reference_job):
    source_run = h.BASE / "two-nodes"
    source = source_run / "checkpoints" / "step-00000016"  # decay starts after step 16: stable phase
    before = h.tree_digest(source_run)
    name = "slurm-continued"
    job = submit(cluster, "slurm/continue.sh", name, DATA=str(h.prepared("hh_helpful_dialogues.txt")),
                 INIT_FROM=str(source),
                 EXTRA=EXTRA + " --max-steps 8 --warmup-steps 2 --decay-steps 4 --eval-interval 0")
    info = cluster.wait_done(job, 600)
    text = log_of(name)
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert f"initialised from {source} at step 0" in text
    assert sorted(h.train_lines(h.BASE / name)) == list(range(1, 9))
    assert (h.BASE / name / "final" / "model.safetensors").is_file()
    assert h.tree_digest(source_run) == before, "the source run was modified"


def test_continue_without_a_checkpoint_is_refused(cluster):
    job = submit(cluster, "slurm/continue.sh", "continue-no-source", nodes=1, DATA=str(h.prepared()))
    info = cluster.wait_done(job, 120)
    assert info["JobState"] == "FAILED" and "needs INIT_FROM" in last_line("continue-no-source")


def test_four_tasks_without_rank_variables_exit_2_naming_the_fix(cluster):
    rundir = h.BASE / "rankless"
    done = cluster.run(["srun", "--nodes=2", "--ntasks=4", "--cpus-per-task=1", "--time=5", sys.executable,
                        *h.train_cmd(1, rundir, h.prepared())[1:]], check=False, cwd=h.REPO,
                       env=dict(h.env(), SLURM_CONF=cluster.env["SLURM_CONF"]), timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and all("srun started 4 tasks" in line and "--ntasks-per-node=1" in line
                                    and "doge.launch" in line for line in errors), done.stderr[-3000:]
    assert not (rundir / "checkpoints").exists()


def test_job_scripts_are_valid_bash():
    for script in sorted((h.REPO / "slurm").glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_prepare_array_gives_the_same_samples_for_1_and_3_tasks_and_a_killed_task_reruns_alone(cluster):
    from conftest_data import python_text

    from doge.data.loader import open_pretrain_data

    corpus = h.BASE / "prep-corpus"  # three files, one unit each, in this order
    corpus.mkdir(exist_ok=True)
    for name, source in (("0-tinyshakespeare.txt", h.PRETRAIN / "tinyshakespeare.txt"),
                         ("1-python-stdlib-source.txt", python_text()[1]),  # ~5 MB: seconds of work
                         ("2-hh-helpful-dialogues.txt", h.PRETRAIN / "hh_helpful_dialogues.txt")):
        shutil.copyfile(source, corpus / name)
    inputs = " ".join(str(p) for p in sorted(corpus.iterdir()))
    settings = dict(INPUT=inputs, TOKENIZER=str(h.tokenizer()),
                    PREP_FLAGS=f"--seq-len {h.SEQ_LEN} --val-fraction 0.01 --val-rows 64 --workers 1 --quiet")

    def prepare(name, array):
        log = h.BASE / f"{name}-%a.log"
        return cluster.sbatch([f"--array={array}", "--cpus-per-task=1", "--time=10", f"--output={log}",
                               f"--error={log}", "slurm/prepare.sh"],
                              h.env(OUTPUT=str(h.BASE / name), **settings), h.REPO)

    one = prepare("prep-1", "0")
    three = prepare("prep-3", "0-2")
    # task 1 of 3 owns Python's stdlib source: kill it while prepare.py works on that part
    h.wait_for(lambda: (h.BASE / "prep-3" / "parts" / "part-00001.partial").exists(), 300, "task 1 working",
               poll=0.1)
    cluster.run(["scancel", f"{three}_1"])
    assert cluster.wait_done(f"{three}_1", 120)["JobState"] == "CANCELLED"
    for task in (0, 2):
        assert cluster.wait_done(f"{three}_{task}", 300)["JobState"] == "COMPLETED"
    assert cluster.wait_done(one, 300)["JobState"] == "COMPLETED", (h.BASE / "prep-1-0.log").read_text()[-2000:]
    assert not (h.BASE / "prep-3" / "manifest.json").exists(), "combined although a part is missing"
    assert "not yet complete" in (h.BASE / "prep-3-0.log").read_text() + (h.BASE / "prep-3-2.log").read_text()

    rerun = prepare("prep-3", "1")  # task 1 alone, same settings: it follows the recorded plan of 3 tasks
    assert cluster.wait_done(rerun, 300)["JobState"] == "COMPLETED", (h.BASE / "prep-3-1.log").read_text()[-2000:]
    assert "task 1 of 3: units [1]" in (h.BASE / "prep-3-1.log").read_text()
    train = [open_pretrain_data(h.BASE / name, seed=0) for name in ("prep-1", "prep-3")]
    rows = json.loads((h.BASE / "prep-1" / "manifest.json").read_text())["splits"]["train"]["rows"]
    assert rows > 1000 and np.array_equal(train[0].samples(range(rows)), train[1].samples(range(rows)))
    assert train[0].fingerprint == train[1].fingerprint
    val = [open_pretrain_data(h.BASE / name, seed=0, split="val") for name in ("prep-1", "prep-3")]
    assert len(val[0]) == len(val[1]) > 0 and all(np.array_equal(val[0][i], val[1][i]) for i in range(len(val[0])))
