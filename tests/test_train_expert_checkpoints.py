"""Checkpoints of runs with sharded CDMoE expert tables: kill -9 and resume at the same sizes is
bit-identical; a checkpoint loads at another world size and expert-parallel size with every weight
and both Adam moments exactly as written and the optimizer groups' weight decay as before; the HF
export holds the shards put together; a dense model upcycled by the trainer starts at the dense
model's loss and continues without a loss spike."""
import json
import shutil

import pytest
import torch
import train_harness as h
import transformers
from safetensors.torch import load_file
from test_train_expert_parallel import moe_recipe

from doge.training.checkpoint import find_latest

pytestmark = pytest.mark.slow

SHORT = ["--max-steps", "8", "--warmup-steps", "1", "--decay-steps", "2", "--save-interval", "4",
         "--eval-interval", "0"]


def sharded_cmd(world: int, rundir, ep_size: int, *extra: str) -> list[str]:
    return h.train_cmd(world, rundir, h.prepared(), "--recipe", moe_recipe(), "--expert-parallel-size",
                       str(ep_size), *SHORT, *extra)


def source_checkpoint(world: int, ep_size: int):
    """A 4-step run's step-4 checkpoint at (world, ep_size), stopped by --max-steps 4."""
    rundir = h.BASE / f"ep-source-w{world}-e{ep_size}"
    if not (rundir / "checkpoints" / "step-00000004").is_dir():
        h.run(sharded_cmd(world, rundir, ep_size, "--max-steps", "4", "--export", "false"), timeout=900)
    return rundir / "checkpoints" / "step-00000004"


def loaded(ckpt, world: int, ep_size: int) -> dict:
    out = h.BASE / f"loaded-{ckpt.parent.parent.name}-w{world}-e{ep_size}.pt"
    h.run(["torchrun", "--standalone", "--nproc_per_node", str(world), "tests/ep_worker.py", "load", str(ckpt),
           str(ep_size), str(out)], timeout=900, PYTHONPATH=f"{h.REPO}:{h.REPO / 'tests'}")
    return torch.load(out)


def test_kill9_and_resume_with_sharded_experts_is_bit_identical():
    reference, rundir = h.BASE / "ep-uninterrupted", h.BASE / "ep-killed"
    h.run(sharded_cmd(2, reference, 2), timeout=900)
    cmd = sharded_cmd(2, rundir, 2)
    job = h.start(cmd, h.BASE / "ep-killed.log", DOGE_FAULT_STEP_SECONDS="1")
    h.wait_for(lambda: h.last_step(rundir) >= 5, 600, "step 5 (after the step-4 checkpoint)", job)
    h.kill9_group(job)
    assert find_latest(rundir / "checkpoints").name == "step-00000004"
    done = h.run(cmd, timeout=900)
    assert "step-00000004 at step 4" in done.stdout
    h.assert_bit_identical(h.final_weights(reference), h.final_weights(rundir))
    assert h.final_weights(rundir)["model.layers.0.mlp.down_embed.weight"].shape[0] == 64, "the export is whole"


@pytest.mark.parametrize("source,target", [((2, 2), (1, 1)), ((4, 2), (2, 2))], ids=["w2e2-w1e1", "w4e2-w2e2"])
def test_sharded_checkpoint_loads_exactly_at_another_world_and_expert_size(source, target):
    ckpt = source_checkpoint(*source)
    written, moved = loaded(ckpt, *source), loaded(ckpt, *target)
    assert written["exp_avg_sq"]["model.layers.0.mlp.down_embed.weight"].shape[0] == 64
    assert all(v.abs().sum() > 0 for k, v in written["exp_avg_sq"].items() if not k.endswith(".A")), "trained"
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert moved[key].keys() == written[key].keys()
        for name, value in written[key].items():
            assert torch.equal(moved[key][name], value), f"{key} {name}"
    assert dict(written["groups"]) == {"decay": 0.01, "no_decay": 0.0, "ep_size_2": 0.01}
    assert dict(moved["groups"]) == {k: v for k, v in dict(written["groups"]).items()
                                     if target[1] > 1 or not k.startswith("ep_size")}

    rundir = h.BASE / f"ep-resumed-{source}-{target}"  # the trainer resumes the run at the new sizes
    shutil.copytree(ckpt.parent.parent, rundir)
    done = h.run(sharded_cmd(target[0], rundir, target[1], "--max-steps", "6", "--export", "false"), timeout=900)
    assert "resumed from" in done.stdout and "step-00000004 at step 4" in done.stdout
    lines = h.train_lines(rundir)
    assert sorted(lines)[-2:] == [5, 6] and all(lines[s]["loss"] < 10 for s in (5, 6))
    state = json.loads((rundir / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert (state["world_size"], state["recipe"]["expert_parallel_size"]) == target


def test_export_of_sharded_checkpoint_holds_the_gathered_tables():
    ckpt = source_checkpoint(2, 2)
    out = h.BASE / "ep-export"
    h.run(["python", "-m", "doge.export", str(ckpt), str(out)])
    exported = load_file(str(out / "model.safetensors"))
    layers = json.loads((ckpt / "trainer_state.json").read_text())["model_config"]["num_hidden_layers"]
    prefix = "mlp.deepspeed_moe.experts.deepspeed_experts"
    for layer in range(layers):
        shards = [torch.load(ckpt / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt") for e in (0, 1)]
        for table in ("down_embed", "up_embed"):
            gathered = torch.cat([s[f"model.layers.{layer}.{prefix}.{e}.{table}.weight"] for e, s in enumerate(shards)])
            assert torch.equal(exported[f"model.layers.{layer}.mlp.{table}.weight"], gathered)
    dense = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(exported[k], v) for k, v in dense.items() if k != "lm_head.weight")
    stock = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert stock.config.is_moe and stock.config.num_experts == 64
    assert torch.equal(stock.state_dict()["model.layers.0.mlp.up_embed.weight"],
                       exported["model.layers.0.mlp.up_embed.weight"])


def test_upcycled_continued_run_starts_at_the_dense_loss_without_a_spike():
    """The dense model (the reference run's export) on the same 50 batches: a run with --lr 1e-30
    (updates below fp32 resolution; its export shows the weights did not move) logs exactly its
    losses. The upcycled run (64 experts top-4, E = 2) logs the same loss at the first step and
    never more than 0.05 nats above the dense model's on any of the 50 steps."""
    dense_export = h.reference_run() / "final"
    common = ["--model", str(dense_export), "--max-steps", "50", "--warmup-steps", "5", "--decay-steps", "10",
              "--lr", "1e-3", "--save-interval", "0", "--eval-interval", "0", "--export", "false"]
    frozen, upcycled = h.BASE / "dense-frozen", h.BASE / "upcycled"
    h.run(h.train_cmd(2, frozen, h.prepared(), *common, "--lr", "1e-30", "--export", "true"), timeout=900)
    still = load_file(str(frozen / "final" / "model.safetensors"))
    for name, value in load_file(str(dense_export / "model.safetensors")).items():
        assert (still[name] - value).abs().max() <= 1e-20, name
    done = h.run(h.train_cmd(2, upcycled, h.prepared(), *common, "--upcycle-experts", "64", "--upcycle-top-k",
                             "4", "--expert-parallel-size", "2"), timeout=900)
    assert "upcycled to 64 experts top-4" in done.stdout
    dense, moe = h.train_lines(frozen), h.train_lines(upcycled)
    assert sorted(dense) == sorted(moe) == list(range(1, 51))
    assert moe[1]["loss"] == pytest.approx(dense[1]["loss"], abs=1e-5, rel=0)
    rises = {s: moe[s]["loss"] - dense[s]["loss"] for s in dense}
    assert max(rises.values()) <= 0.05, rises
    assert moe[50]["experts_used"] > 0 and "aux_loss" in moe[50]
    state = json.loads((upcycled / "checkpoints" / "step-00000050" / "trainer_state.json").read_text())
    assert state["model_config"]["is_moe"] and state["model_config"]["num_experts"] == 64


def test_upcycling_needs_a_dense_start_and_both_sizes():
    from test_train_preflight import assert_one_clean_line

    for extra, message in (
            (["--upcycle-experts", "64", "--upcycle-top-k", "4"], "needs a trained dense model to start from"),
            (["--model", str(h.reference_run() / "final"), "--upcycle-experts", "64"], "go together"),
            (["--model", str(h.reference_run() / "final"), "--upcycle-experts", "60", "--upcycle-top-k", "4"],
             "must be a perfect square")):
        rundir = h.BASE / "upcycle-refused"
        done = h.run(h.train_cmd(1, rundir, h.prepared(), *extra), expect_rc=2, timeout=120)
        assert_one_clean_line(done, message)
        assert not rundir.exists()

