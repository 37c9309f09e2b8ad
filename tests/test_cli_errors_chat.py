"""Bad input to the chat data tool (data_tools/prepare_chat.py) and the post-training entry points
(doge/sft.py, doge/dpo.py), table-driven where the cases share a shape.

The rule everywhere: one `error: WHAT: what is wrong; the fix` line on stderr, exit 2, no traceback,
nothing left behind, checked before slow work. Records that are fine as data but cannot train are
skipped, counted per source (with `FILE line N` samples) and reported on the console. The DPO run
here is one short single-rank run; its two resumes are refused in preflight.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import sys
import time

import pytest
import train_harness as h
from test_posttrain import CHAT_LEN, OASST, dpo_data, sft_data
from test_train_preflight import assert_one_clean_line, lone_rank_of_two

TOOL = [sys.executable, "data_tools/prepare_chat.py"]
# Conversations must open with a user turn (a template's raise_exception, as in Llama/Mistral templates).
STRICT = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must open with a user turn') }}"
          "{% endif %}")


def write_jsonl(path, records) -> h.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@functools.lru_cache(maxsize=None)
def sft_records() -> h.Path:
    h._make_base()
    return write_jsonl(h.BASE / "chat-errors-sft.jsonl", [
        {"messages": [turn("user", "What is 2 + 3?"), turn("assistant", "5")]},
        {"messages": [turn("assistant", "I speak first"), turn("user", "ok")]},  # no header before turn 0
        {"messages": [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello")]},  # STRICT
        {"messages": [turn("user", "Name a colour."), turn("assistant", "Blue.")]}])


@functools.lru_cache(maxsize=None)
def strict_tokenizer() -> h.Path:
    out = h.BASE / "tokenizer-strict"
    shutil.copytree(h.tokenizer(), out)
    template = out / "chat_template.jinja"
    template.write_text(STRICT + template.read_text())
    return out


def prepare(tmp_path, *args, expect_rc=0):
    return h.run([*TOOL, "--tokenizer", str(h.tokenizer()), *args], expect_rc=expect_rc, timeout=120)


def manifest_source(datadir) -> dict:
    (source,) = json.loads((datadir / "manifest.json").read_text())["sources"]
    return source


# ----------------------------------------------------------------------------- prepare_chat: bad flags
BAD_FLAGS = {
    "val-fraction-not-a-number": (["--val-fraction", "abc"], "--val-fraction abc: not a number; pass a fraction"),
    "val-fraction-one": (["--val-fraction", "1"], "--val-fraction 1: must be 0 <= f < 1"),
    "val-fraction-two": (["--val-fraction", "2"], "--val-fraction 2: must be 0 <= f < 1"),
    "val-fraction-negative": (["--val-fraction=-0.5"], "--val-fraction -0.5: must be 0 <= f < 1"),
    "val-rows-negative": (["--val-rows=-3"], "--val-rows -3: must be a whole number >= 0"),
    "seq-len-too-small": (["--seq-len", "4"], "--seq-len 4: too small for a chat row"),
    "seq-len-too-big": (["--seq-len", str(1 << 30)], f"--seq-len {1 << 30}: every row is padded to it"),
    "seq-len-not-a-number": (["--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'; see"),
    "fields-one-name": (["--fields", "question"], "--fields question: takes two field names; pass --fields "
                                                  "PROMPT,ANSWER"),
    "fields-with-dpo": (["--kind", "dpo", "--fields", "a,b"], "--fields is for --kind sft"),
    "kind-unknown": (["--kind", "ppo"], "argument --kind: invalid choice: 'ppo'"),
    "input-missing": (["--input", "/no/such/chat.jsonl"], "/no/such/chat.jsonl: no such file, folder or glob match"),
    "input-plain-text": (["--input", str(h.PRETRAIN / "tinyshakespeare.txt")],
                         "tinyshakespeare.txt: chat data must be JSON Lines or parquet records, not plain text"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_prepare_chat_refuses_a_bad_flag_at_once_in_one_line(case, tmp_path):
    extra, message = BAD_FLAGS[case]
    out = tmp_path / "out"
    began = time.monotonic()
    done = prepare(tmp_path, "--kind", "sft", "--input", str(sft_records()), "--seq-len", "64", "--output",
                   str(out), *extra, expect_rc=2)
    elapsed = time.monotonic() - began
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert ";" in lines[0] and "Traceback" not in done.stderr  # what is wrong; the fix
    assert not done.stdout.strip() and list(tmp_path.iterdir()) == []  # no DATADIR, no staging folder
    assert elapsed < 5, f"{elapsed:.1f} s: the flag is checked before any record is rendered"


# ----------------------------------------------------------------------------- prepare_chat: skipped records
def test_records_the_chat_template_rejects_are_skipped_and_counted_with_file_and_line(tmp_path):
    """An assistant-first conversation (transformers renders no header before it) and a system-first one
    (the template's raise_exception) are two records among good ones: skipped and counted, not fatal."""
    out = tmp_path / "sft"
    done = h.run([*TOOL, "--kind", "sft", "--input", str(sft_records()), "--tokenizer", str(strict_tokenizer()),
                  "--seq-len", "64", "--output", str(out), "--val-fraction", "0"], timeout=120)
    source = manifest_source(out)
    assert (source["records"], source["kept"], source["template_rejected"]) == (4, 2, 2)
    first, second = source["samples"]["template_rejected"]
    assert first.startswith(f"{sft_records()} line 2: ") and second.startswith(f"{sft_records()} line 3: ")
    assert "Conversation must open with a user turn" in second
    assert f"{sft_records()}: 4 records: 2 kept (0 truncated), skipped 2 template_rejected" in done.stdout
    assert f"template_rejected: e.g. {sft_records()} line 2" in done.stdout and "Traceback" not in done.stderr


def test_dpo_pairs_that_teach_nothing_are_dropped_and_the_console_says_so(tmp_path):
    """Identical answers (also when they differ only past --seq-len) or an empty one give no DPO gradient;
    a pair with no prompt turn is one the template cannot render: all are counted, and with most records
    dropped the console warns."""
    common = "the same long answer " * 40
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Is water wet?", "chosen": "Yes.", "rejected": "No idea, go away."},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Hi!"},
        {"prompt": "Say hi.", "chosen": "", "rejected": "Hi!"},
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "   "},
        {"prompt": "Say more.", "chosen": common + "A", "rejected": common + "B"},
        {"chosen": [turn("assistant", "a")], "rejected": [turn("assistant", "b")]},
        {"prompt": "Best colour?", "chosen": "Blue, calm and clear.", "rejected": "Colours are a scam."}])
    out = tmp_path / "dpo"
    done = prepare(tmp_path, "--kind", "dpo", "--input", str(path), "--seq-len", "64", "--output", str(out),
                   "--val-fraction", "0")
    source = manifest_source(out)
    counts = {k: source[k] for k in ("records", "kept", "identical_pair", "empty_answer", "template_rejected")}
    assert counts == {"records": 7, "kept": 2, "identical_pair": 2, "empty_answer": 2, "template_rejected": 1}
    assert source["samples"]["identical_pair"] == [f"{path} line 2", f"{path} line 5: identical within --seq-len 64"]
    assert source["samples"]["empty_answer"] == [f"{path} line 3", f"{path} line 4"]
    assert f"{path}: 7 records: 2 kept (0 truncated), skipped 1 template_rejected, 2 identical_pair, 2 empty_answer" \
        in done.stdout
    assert f"warning: {path}: only 2 of 7 records kept" in done.stderr

    from doge.data.chat import open_chat_data

    data = open_chat_data(out, "dpo")
    ids, _ = data.rows(range(len(data)))
    assert len(data) == 2 and all((ids[i] != ids[i + 1]).any() for i in (0, 2))


def test_the_console_prints_what_was_kept_truncated_and_dropped(tmp_path):
    out = tmp_path / "oasst"
    done = prepare(tmp_path, "--kind", "sft", "--input", str(OASST), "--seq-len", "64", "--output", str(out))
    source = manifest_source(out)
    skipped = ", ".join(f"{source[k]} {k}" for k in ("too_long",) if source[k])
    line = f"{OASST}: 30 records: {source['kept']} kept ({source['truncated']} truncated)"
    assert line + (f", skipped {skipped}" if skipped else "") in done.stdout.splitlines()
    assert source["truncated"] * 2 > source["kept"] > 0  # 64 tokens cut most OpenAssistant conversations
    assert f"warning: {OASST}: {source['truncated']} of {source['kept']} kept examples were cut at --seq-len 64" \
        in done.stderr and done.stdout.rstrip().endswith(f"wrote {out}")


# ----------------------------------------------------------------------------- SFT / DPO entry points
@functools.lru_cache(maxsize=None)
def chat_export(name: str = "chat-export", seed: int = 0) -> h.Path:
    """A tiny Doge export with the session's tokenizer: what SFT and DPO start from (DPO: its reference)."""
    import torch

    from doge import DogeConfig, DogeForCausalLM
    from doge.data.tokenizer import load_tokenizer

    out = h.BASE / name
    torch.manual_seed(seed)
    DogeForCausalLM(DogeConfig.from_preset("doge-tiny", vocab_size=1024)).save_pretrained(out)
    load_tokenizer(str(h.tokenizer())).save_pretrained(out)
    return out


@functools.lru_cache(maxsize=None)
def empty_chat_data() -> h.Path:
    """A well-formed chat DATADIR whose train split holds no example (prepare_chat.py now refuses to
    write one; an older or hand-made DATADIR can still be like this)."""
    from doge.data.chat_prepare import ChatPrepareConfig, _write
    from doge.data.tokenizer import load_tokenizer

    out = h.BASE / "chat-empty"
    cfg = ChatPrepareConfig(inputs=["none"], tokenizer=str(h.tokenizer()), output=out, kind="sft", seq_len=CHAT_LEN)
    _write(cfg, load_tokenizer(str(h.tokenizer())), [], [{"spec": "none", "records": 0, "kept": 0}])
    return out


ENTRY_ERRORS = {  # entry script, its data, extra flags, the error line
    "empty-chat-datadir": ("sft", empty_chat_data, [],
                           "no training sft example (train split empty, 0 held out): prepare it again with "
                           "data_tools/prepare_chat.py"),
    "sft-epochs-zero": ("sft", sft_data, ["--epochs", "0"], "--epochs (recipe key epochs) = 0: a run needs a "
                                                              "positive number of passes"),
    "epochs-too-short-for-the-warmup": ("sft", sft_data, [], "--epochs 2 of {examples} examples at 1024 per step "
                                                             "gives max_steps 1; learning-rate schedule: decay "
                                                             "starts at step -99, before warmup ends at 100: lower "
                                                             "--warmup-steps or --decay-steps, raise --epochs"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ENTRY_ERRORS)
def test_post_training_entry_point_refuses_before_the_process_group(case, tmp_path):
    """Each is one line and exit 2 from a lone rank of two, which would hang if it reached DeepSpeed."""
    kind, data, extra, message = ENTRY_ERRORS[case]
    examples = json.loads((data() / "manifest.json").read_text())["splits"]["train"]["examples"]
    message, rundir = message.format(examples=examples), tmp_path / "run"
    cmd = [sys.executable, f"doge/{kind}.py", "--deepspeed", "ds_configs/zero2.json", "--model", str(chat_export()),
           "--data", str(data()), "--output", str(rundir), "--wandb", "off", *extra]
    done = h.run(cmd, expect_rc=2, timeout=120, **lone_rank_of_two())
    assert_one_clean_line(done, message)
    assert not rundir.exists()


@pytest.mark.parametrize("objective, flags, message", [
    ("sft", ["--epochs", "0"], "--epochs (recipe key epochs) = 0: a run needs a positive number of passes"),
    ("dpo", ["--epochs", "0"], "--epochs (recipe key epochs) = 0: a run needs a positive number of passes"),
    ("dpo", ["--epochs", "-1"], "--epochs (recipe key epochs) = -1: a run needs a positive number of passes"),
    ("sft", ["--epochs", "none"], "--epochs none needs --max-steps (recipe key max_steps): give the run's length")])
def test_a_run_length_of_no_epochs_is_refused_naming_epochs(objective, flags, message, tmp_path):
    """In process: parse_args and preflight are what each rank runs before DeepSpeed (the subprocess
    cases above show that path end to end)."""
    import argparse

    from doge.training.cli import parse_args
    from doge.training.preflight import preflight
    from doge.training.recipe import ConfigError

    argv = ["--deepspeed", "ds_configs/zero2.json", "--model", str(chat_export()), "--data", str(sft_data()),
            "--output", str(tmp_path / "run"), *flags]
    with pytest.raises(ConfigError) as err:
        args, recipe = parse_args(objective_class(objective).recipe_class, "", argv)
        preflight(argparse.Namespace(**vars(args)), recipe, objective_class(objective), 1)
    assert message in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective, flags", [
    ("sft", ["--beta", "5"]), ("sft", ["--reference-sha256", "0" * 64]), ("sft", ["--upcycle-experts", "4"]),
    ("pretrain", ["--epochs", "1"]), ("pretrain", ["--beta", "5"]), ("dpo", ["--upcycle-top-k", "2"])])
def test_each_entry_point_accepts_only_its_own_objectives_flags(objective, flags, capsys):
    from doge.training.cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(objective_class(objective).recipe_class, "",
                   ["--deepspeed", "x.json", "--data", "d", "--output", "o", *flags])
    assert exit_.value.code == 2 and f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err


def objective_class(name: str):
    from doge.training.posttrain import DPOObjective, SFTObjective
    from doge.training.pretrain import PretrainObjective

    return {"sft": SFTObjective, "dpo": DPOObjective, "pretrain": PretrainObjective}[name]


def test_a_derived_recipe_field_is_no_yaml_key(tmp_path):
    from doge.training.recipe import ConfigError

    path = tmp_path / "dpo.yaml"
    path.write_text((h.REPO / "recipes" / "dpo-doge-20m.yaml").read_text() + "reference_sha256: abc\n")
    with pytest.raises(ConfigError, match=r"unknown recipe key\(s\) \['reference_sha256'\] for DPO"):
        objective_class("dpo").recipe_class.load(str(path), {})


@pytest.mark.parametrize("kind, lr, tokens", [("sft", 8e-4, 262144), ("dpo", 8e-5, 131072)])
def test_without_a_recipe_a_chat_run_takes_post_training_defaults_and_the_datas_row_length(kind, lr, tokens,
                                                                                          tmp_path):
    """No --recipe, no --seq-len, no --max-steps: the chat recipe's LR and batch, the data's 256-token rows
    (not 2048 or 1024), and max_steps from the default two epochs (not 8000)."""
    import argparse

    from doge.training import runlock
    from doge.training.preflight import preflight

    data = sft_data() if kind == "sft" else dpo_data()
    objective = objective_class(kind)
    recipe = objective.recipe_class.load(None, {"model": str(chat_export()), "warmup_steps": 0, "decay_steps": 0})
    args = argparse.Namespace(output=str(tmp_path / "run"), deepspeed="ds_configs/zero2.json", data=str(data))
    plan = preflight(args, recipe, objective, 1)
    runlock.release(plan.rundir)
    examples = json.loads((data / "manifest.json").read_text())["splits"]["train"]["examples"]
    assert (plan.recipe.seq_len, plan.recipe.lr, plan.recipe.epochs) == (CHAT_LEN, lr, 2)
    assert plan.global_batch == tokens // CHAT_LEN
    assert plan.recipe.max_steps == math.ceil(2 * examples / plan.global_batch) < 8000


# ----------------------------------------------------------------------------- DPO: what a resume must keep
def weights_sha256(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def dpo_cmd(reference, rundir, *extra) -> list[str]:
    return [sys.executable, "doge/dpo.py", "--deepspeed", "ds_configs/zero2.json", "--model", str(reference),
            "--data", str(dpo_data()), "--output", str(rundir), "--epochs", "none", "--max-steps", "2",
            "--micro-batch-size", "2", "--global-batch-tokens", str(2 * CHAT_LEN), "--warmup-steps", "0",
            "--decay-steps", "1", "--save-interval", "0", "--eval-interval", "0", "--precision", "fp32", "--wandb",
            "off", "--export", "false", "--compile", "off", *extra]


@functools.lru_cache(maxsize=None)
def dpo_run() -> tuple[h.Path, h.Path]:
    """(reference export, RUNDIR): two single-rank DPO steps, beta 0.1, one checkpoint."""
    reference, rundir = h.BASE / "dpo-reference", h.BASE / "dpo-resume-run"
    shutil.copytree(chat_export(), reference)
    h.run(dpo_cmd(reference, rundir, "--beta", "0.1"), timeout=300)
    return reference, rundir


@pytest.mark.slow
@pytest.mark.parametrize("change", ["beta", "reference"])
def test_a_dpo_resume_that_changes_the_objective_is_refused_naming_both_values(change):
    reference, rundir = dpo_run()
    checkpoint = rundir / "checkpoints" / "step-00000002"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    trained = weights_sha256(reference)
    assert (state["recipe"]["beta"], state["recipe"]["reference_sha256"]) == (0.1, trained)
    saved = h.BASE / "dpo-reference-saved"
    if change == "beta":
        cmd, message = dpo_cmd(reference, rundir, "--beta", "0.2"), (
            f"--beta (recipe key beta) = 0.2 differs from checkpoint {checkpoint}, trained with beta = 0.1")
    else:  # another model written over the reference, at the same path
        shutil.copytree(reference, saved)
        shutil.copy(chat_export("chat-export-other", seed=1) / "model.safetensors", reference)
        replaced = weights_sha256(reference)
        cmd, message = dpo_cmd(reference, rundir, "--beta", "0.1"), (
            f"--model {reference}: the sha256 of the frozen reference's weights (the --model export's safetensors "
            f"files) is now {replaced}, but checkpoint {checkpoint} was trained against {trained}")
    try:
        done = h.run(cmd, expect_rc=2, timeout=120)
    finally:
        if saved.exists():
            shutil.rmtree(reference)
            saved.rename(reference)
    assert_one_clean_line(done, message)
    assert sorted(p.name for p in (rundir / "checkpoints").glob("step-*")) == ["step-00000002"]
