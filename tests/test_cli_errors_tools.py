"""Bad input to the tools around the trainer ends in one `error: ...` line and exit 2, never a
traceback, with nothing created: `python -m doge.export`, `python -m doge.upcycle`, the slurm/
batch scripts run outside SLURM, and `python -m doge.launch` (whose last line is the rank's
error, once, after DeepSpeed's launcher lines). Also: two plain `python doge/train.py` runs on one host
at once each get their own rendezvous port, and their checkpoints feed the export and upcycle
commands (a RUNDIR exports its newest checkpoint, a checkpoint upcycles directly)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_harness as h
from conftest import tiny_config

from doge import DogeForCausalLM
from doge.export import main as export_main
from doge.training.checkpoint import STATE_FILE, write_manifest
from doge.upcycle import main as upcycle_main

SCRIPTS = ["pretrain_20m.sh", "pretrain_60m.sh", "pretrain_160m.sh", "pretrain_320m.sh", "continue.sh", "prepare.sh"]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def one_error(text: str, *words: str) -> str:
    """The single line of `text`: an `error: ...` line naming each of `words`."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def refused(main, argv: list[str], capsys, root: Path, *words: str) -> str:
    """`main(argv)` in-process: exit 2 (returned or raised by argparse), one error line, nothing new under root."""
    before = tree(root)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert tree(root) == before, "a refused command created files"
    return one_error(err, *words)


def fake_checkpoint(folder: Path, truncate: str | None = None, drop: str | None = None) -> Path:
    """A checkpoint's layout (engine files, trainer state, manifest) with made-up bytes, then damaged."""
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 100)
    (folder / STATE_FILE).write_text(json.dumps({"step": 4, "model_config": tiny_config().to_dict()}))
    write_manifest(folder)
    if truncate:
        (folder / truncate).write_bytes(b"m" * 10)
    if drop:
        (folder / drop).unlink()
    return folder


# --- python -m doge.export ------------------------------------------------------------------------------------

def _export_case(name: str, tmp: Path) -> tuple[list, tuple]:
    """(argv, words the error line must contain) for one bad input, its files made under tmp."""
    out = tmp / "out"
    if name == "missing-ckpt":
        return [tmp / "nope", out], ("CKPT", "nope", "does not exist", "RUNDIR/checkpoints/step-")
    if name == "ckpt-is-file":
        (tmp / "f.txt").write_text("x")
        return [tmp / "f.txt", out], ("f.txt", "is a file", "RUNDIR/checkpoints/step-")
    if name == "not-a-checkpoint":
        (tmp / "plain").mkdir()
        return [tmp / "plain", out], ("plain", "not a checkpoint", "RUNDIR/checkpoints/step-")
    if name == "hf-export":
        (tmp / "final").mkdir()
        (tmp / "final" / "config.json").write_text("{}")
        (tmp / "final" / "model.safetensors").write_bytes(b"")
        return [tmp / "final", out], ("final", "already a Hugging Face export")
    if name == "rundir-without-checkpoint":
        (tmp / "run" / "checkpoints").mkdir(parents=True)
        return [tmp / "run", out], ("run", "no complete checkpoint", "none saved yet", "--save-interval")
    if name == "missing-optimizer-file":
        ckpt = fake_checkpoint(tmp / "run" / "checkpoints" / "step-00000004",
                               drop="zero_pp_rank_0_mp_rank_00_optim_states.pt")
        return [ckpt, out], ("step-00000004", "optim_states.pt is missing", "restore the file")
    if name == "truncated-model-states":
        ckpt = fake_checkpoint(tmp / "run" / "checkpoints" / "step-00000004", truncate="mp_rank_00_model_states.pt")
        return [ckpt, out], ("model_states.pt has 10 bytes, the manifest says 100", "restore the file")
    if name == "rundir-only-damaged":
        fake_checkpoint(tmp / "run" / "checkpoints" / "step-00000004", truncate="mp_rank_00_model_states.pt")
        return [tmp / "run", out], ("no complete checkpoint", "step-00000004", "model_states.pt")
    if name == "outdir-is-file":
        ckpt = fake_checkpoint(tmp / "ck" / "step-00000004")
        (tmp / "out.txt").write_text("x")
        return [ckpt, tmp / "out.txt"], ("OUTDIR", "out.txt", "is a file", "new folder")
    if name == "outdir-exists":
        ckpt = fake_checkpoint(tmp / "ck" / "step-00000004")
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        return [ckpt, out], ("OUTDIR", "exists", "choose a new folder")
    if name == "missing-argument":
        return [tmp], ("OUTDIR", "--help")
    raise KeyError(name)


EXPORT_CASES = ["missing-ckpt", "ckpt-is-file", "not-a-checkpoint", "hf-export", "rundir-without-checkpoint",
                "missing-optimizer-file", "truncated-model-states", "rundir-only-damaged", "outdir-is-file",
                "outdir-exists", "missing-argument"]


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_refuses_bad_input_with_one_line(case, tmp_path, capsys):
    argv, words = _export_case(case, tmp_path)
    refused(export_main, argv, capsys, tmp_path, *words)
    if case == "outdir-exists":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- python -m doge.upcycle -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense") / "dense"
    DogeForCausalLM(tiny_config()).save_pretrained(folder)
    return folder


def _upcycle_case(name: str, tmp: Path, dense: Path) -> tuple[list, tuple]:
    out = tmp / "moe"
    flags = ["--num-experts", "16", "--top-k", "2"]
    counts = {"zero-experts": ("0", "2", "0 experts"), "negative-experts": ("-4", "2", "-4 experts"),
              "non-square-experts": ("60", "4", "perfect square"), "zero-top-k": ("16", "0", "top-k 0"),
              "negative-top-k": ("16", "-1", "top-k -1"), "top-k-above-experts": ("16", "17", "top-k 17")}
    if name in counts:
        experts, top_k, word = counts[name]
        return [dense, out, "--num-experts", experts, "--top-k", top_k], ("--num-experts", word)
    if name == "experts-not-a-number":
        return [dense, out, "--num-experts", "many", "--top-k", "2"], ("--num-experts", "many", "--help")
    if name == "missing-top-k":
        return [dense, out, "--num-experts", "16"], ("--top-k", "--help")
    if name == "missing-input":
        return [tmp / "nope", out, *flags], ("DENSE_DIR", "nope", "does not exist", "RUNDIR/final")
    if name == "input-is-file":
        (tmp / "f.txt").write_text("x")
        return [tmp / "f.txt", out, *flags], ("f.txt", "is a file", "RUNDIR/final")
    if name == "input-not-a-model":
        (tmp / "plain").mkdir()
        return [tmp / "plain", out, *flags], ("plain", "no config.json", "RUNDIR/final")
    if name == "input-is-rundir":
        (tmp / "run" / "checkpoints").mkdir(parents=True)
        return [tmp / "run", out, *flags], ("run folder", "RUNDIR/final", "checkpoints")
    if name == "input-incomplete-checkpoint":
        ckpt = fake_checkpoint(tmp / "ck" / "step-00000004", drop="mp_rank_00_model_states.pt")
        return [ckpt, out, *flags], ("step-00000004", "model_states.pt is missing", "restore the file")
    if name == "input-already-moe":
        (tmp / "moe-in").mkdir()
        config = tiny_config(is_moe=True, num_experts=16, num_experts_per_tok=2).to_dict()
        (tmp / "moe-in" / "config.json").write_text(json.dumps(config))
        (tmp / "moe-in" / "model.safetensors").write_bytes(b"")
        return [tmp / "moe-in", out, *flags], ("moe-in", "already a CDMoE", "dense model")
    if name == "input-truncated-weights":
        (tmp / "cut").mkdir()
        shutil.copy(dense / "config.json", tmp / "cut" / "config.json")
        (tmp / "cut" / "model.safetensors").write_bytes((dense / "model.safetensors").read_bytes()[:200])
        return [tmp / "cut", out, *flags], ("cut", "weights cannot be read", "re-export")
    if name == "output-is-file":
        (tmp / "moe.txt").write_text("x")
        return [dense, tmp / "moe.txt", *flags], ("OUT_DIR", "moe.txt", "exists (a file)")
    if name == "output-exists":
        out.mkdir()
        return [dense, out, *flags], ("OUT_DIR", "exists (a folder)", "new output folder")
    raise KeyError(name)


UPCYCLE_CASES = ["zero-experts", "negative-experts", "non-square-experts", "zero-top-k", "negative-top-k",
                 "top-k-above-experts", "experts-not-a-number", "missing-top-k", "missing-input", "input-is-file",
                 "input-not-a-model", "input-is-rundir", "input-incomplete-checkpoint", "input-already-moe",
                 "input-truncated-weights", "output-is-file", "output-exists"]


@pytest.mark.parametrize("case", UPCYCLE_CASES)
def test_upcycle_refuses_bad_input_with_one_line(case, tmp_path, capsys, dense_export):
    argv, words = _upcycle_case(case, tmp_path, dense_export)
    refused(upcycle_main, argv, capsys, tmp_path, *words)


@pytest.mark.parametrize("argv", [
    ["-m", "doge.export", "{tmp}/nope", "{tmp}/out"],
    ["-m", "doge.export", "{run}", "{tmp}/out"],
    ["-m", "doge.upcycle", "{tmp}/nope", "{tmp}/moe", "--num-experts", "16", "--top-k", "2"],
    ["-m", "doge.upcycle", "{tmp}/nope", "{tmp}/moe", "--num-experts", "60", "--top-k", "2"],
    ["-m", "doge.upcycle", "{run}", "{tmp}/moe", "--num-experts", "16", "--top-k", "2"],
], ids=["export-missing", "export-rundir-damaged", "upcycle-missing", "upcycle-non-square", "upcycle-rundir"])
def test_commands_refuse_before_loading_anything(argv, tmp_path):
    """As a user runs them: one line, no traceback, in well under the seconds a model load takes."""
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints" / "step-00000004", truncate="mp_rank_00_model_states.pt")
    before = tree(tmp_path)
    started = time.time()
    done = subprocess.run([sys.executable, *[a.format(tmp=tmp_path, run=run) for a in argv]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    took = time.time() - started
    assert done.returncode == 2 and done.stdout == "", done
    one_error(done.stderr)
    assert tree(tmp_path) == before
    assert took < 5, f"{took:.1f} s: the check should come before torch, the model and DeepSpeed load"


# --- slurm/*.sh outside SLURM ---------------------------------------------------------------------------------

def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "DOGE_"))}
    return {**env, **extra}


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_slurm_scripts_outside_a_job_print_one_line(script, where, tmp_path):
    cwd = h.REPO if where == "repo" else tmp_path
    runs_before = tree(h.REPO / "runs") if (h.REPO / "runs").is_dir() else None
    done = subprocess.run(["bash", str(h.REPO / "slurm" / script)], cwd=cwd, capture_output=True, text=True,
                          timeout=30, env=clean_env(DATA=str(tmp_path), RUN_DIR=str(tmp_path / "run")))
    assert done.returncode == 2 and done.stdout == "", done
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "error: not inside a SLURM job" in line and "sbatch" in line, line
    assert f"slurm/{script}" in line and "unbound" not in line
    assert tree(tmp_path) == []
    assert (tree(h.REPO / "runs") if (h.REPO / "runs").is_dir() else None) == runs_before


@pytest.mark.parametrize("settings,words", [
    (dict(SLURM_JOB_NAME="t"), ("SLURM_JOB_NODELIST is not set", "sbatch")),
    (dict(SLURM_JOB_NODELIST="n1", SLURM_NNODES="1"), ("SLURM_JOB_NAME is not set",)),
    (dict(SLURM_JOB_NAME="t", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", RECIPE="recipes/nope.yaml"),
     ("RECIPE recipes/nope.yaml is not a file",)),
    (dict(SLURM_JOB_NAME="t", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", DS_CONFIG="nope.json"),
     ("DS_CONFIG nope.json is not a file",)),
    (dict(DOGE_REPO="/nonexistent"), ("/nonexistent/slurm/launch.sh not found", "DOGE_REPO")),
], ids=["no-nodelist", "no-job-name", "missing-recipe", "missing-ds-config", "wrong-doge-repo"])
def test_slurm_script_checks_everything_before_making_run_dir(settings, words, tmp_path, tmp_path_factory):
    """Inside something that looks like a job but lacks what the script needs: one line, no RUN_DIR.
    srun and scontrol are stand-ins that fail the test if called (the script stops before)."""
    tools = tmp_path_factory.mktemp("bin")
    for tool in ("srun", "scontrol"):
        (tools / tool).write_text("#!/bin/sh\necho called >&2; exit 99\n")
        (tools / tool).chmod(0o755)
    done = subprocess.run(["bash", "slurm/pretrain_20m.sh"], cwd=h.REPO, capture_output=True, text=True, timeout=30,
                          env=clean_env(SLURM_JOB_ID="7", DATA=str(tmp_path), RUN_DIR=str(tmp_path / "run"),
                                        PATH=f"{tools}{os.pathsep}{os.environ['PATH']}", **settings))
    assert done.returncode == 2 and done.stdout == "", done
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "error: " in line and "unbound" not in line, line
    for word in words:
        assert word in line, line
    assert tree(tmp_path) == []


def test_continue_and_prepare_name_their_missing_settings(tmp_path):
    cases = {"continue.sh": (dict(RECIPE="recipes/doge-tiny.yaml"), "needs INIT_FROM"),
             "prepare.sh": (dict(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_MAX="1", INPUT="x"), "TOKENIZER is not set"),
             "prepare.sh ": (dict(INPUT="x", TOKENIZER="t", OUTPUT="o"), "not an array task")}
    for script, (settings, words) in cases.items():
        done = subprocess.run(["bash", str(h.REPO / "slurm" / script.strip())], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30, env=clean_env(SLURM_JOB_ID="7", **settings))
        assert done.returncode == 2 and done.stdout == "" and words in done.stderr, done
        assert len(done.stderr.strip().splitlines()) == 1
    assert tree(tmp_path) == []


# --- two plain runs at once; their checkpoints through export and upcycle ---------------------------------------

SHORT = ["--max-steps", "4", "--warmup-steps", "1", "--decay-steps", "2", "--save-interval", "4",
         "--eval-interval", "0", "--export", "false"]


@pytest.fixture(scope="module")
def two_runs() -> tuple[Path, Path]:
    """Two `python doge/train.py` runs started together, neither given MASTER_PORT."""
    data = h.prepared()
    env = h.env()
    del env["MASTER_PORT"]
    rundirs = [h.BASE / "concurrent-a", h.BASE / "concurrent-b"]
    procs = [subprocess.Popen(h.train_cmd(1, rundir, data, *SHORT), cwd=h.REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rundir in rundirs]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    return rundirs[0], rundirs[1]


def test_two_plain_runs_on_one_host_both_train(two_runs):
    for rundir in two_runs:
        assert sorted(h.train_lines(rundir)) == [1, 2, 3, 4]
        assert (rundir / "checkpoints" / "step-00000004" / "manifest.json").is_file()


def test_export_takes_a_rundir_and_names_a_damaged_engine_file(two_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "step-00000004, the newest complete checkpoint" in out
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    step = run / "checkpoints" / "step-00000004"
    optim = next(step.glob("*optim_states.pt"))
    with open(optim, "r+b") as fh:
        fh.truncate(optim.stat().st_size // 2)
    refused(export_main, [step, tmp_path / "hf2"], capsys, tmp_path, optim.name, "the manifest says", "restore")
    (step / "mp_rank_00_model_states.pt").unlink()
    refused(export_main, [run, tmp_path / "hf2"], capsys, tmp_path, "no complete checkpoint", "is missing")


def test_upcycle_takes_a_training_checkpoint(two_runs, tmp_path, capsys):
    step = two_runs[1] / "checkpoints" / "step-00000004"
    assert upcycle_main([str(step), str(tmp_path / "moe"), "--num-experts", "16", "--top-k", "2"]) == 0
    assert "16 experts, top-2" in capsys.readouterr().out
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["is_moe"] and config["num_experts"] == 16 and config["num_experts_per_tok"] == 2
    assert (tmp_path / "moe" / "tokenizer.json").is_file()


# --- python -m doge.launch ends with the error ----------------------------------------------------------------

def test_launch_ends_with_the_rank_error_line(tmp_path):
    """DeepSpeed's launcher prints its own lines after a rank's; doge.launch prints the error after them."""
    cmd = [sys.executable, "-m", "doge.launch", "--num_gpus", "1", "--master_port", str(h.free_port()),
           "doge/train.py", "--deepspeed", "ds_configs/zero2.json", "--data", str(tmp_path / "data"),
           "--output", str(tmp_path / "run"), "--max-steps", "abc"]
    done = subprocess.run(cmd, cwd=h.REPO, env=h.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 2, done.stdout[-4000:]
    assert lines[-1].startswith("error: ") and "--max-steps" in lines[-1] and "abc" in lines[-1], lines[-5:]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], "the error once, last"
    assert any("return code = 2" in line for line in lines[:-1]), "DeepSpeed's own lines come before it"
    assert "Traceback" not in done.stdout
    assert not (tmp_path / "run").exists()
