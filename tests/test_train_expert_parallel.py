"""Expert parallelism: CDMoE expert tables split by rows over expert groups, trained by DeepSpeed
ZeRO-1/2, equal a single-process run (weights, both Adam moments, clipped grad norms), also with
the router losses on at the trainer's Adam eps; preflight refuses the combinations DeepSpeed cannot
train."""

import json

import ep_worker as w
import pytest
import torch
import train_harness as h

from doge.training.engine import param_groups
from doge.training.lm_loss import causal_lm_loss, router_statistics
from doge.training.objective import TrainedModel


def group_statistics(world: int, ep_size: int) -> dict:
    """Router statistics of step 1 over the first expert group's micro-batches, one process."""
    model, ids = w.fresh_model(), w.batches(world)[0][:ep_size * w.MICRO]
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    return {k: float(v) for k, v in router_statistics(logits, 64, 4).items()}


def reference(world: int, profile: str = "default") -> dict:
    """Single process, unsharded model, full global batch: the data-parallel objective is the mean of
    the ranks' micro-batch losses (the router losses are per micro-batch), AdamW, clipping."""
    model = w.fresh_model(profile)
    opt = torch.optim.AdamW(param_groups(model, w.WD), lr=w.LR, betas=(0.9, 0.95), eps=w.PROFILES[profile]["eps"])
    norms, logged = [], []
    for ids in w.batches(world, profile):
        losses, metrics = zip(*(causal_lm_loss(TrainedModel(model, model.config), chunk, chunk)
                                for chunk in ids.split(w.MICRO)))
        torch.stack(losses).mean().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), w.CLIP)))
        opt.step()
        opt.zero_grad()
        logged.append({k: float(torch.stack([m[k] for m in metrics]).mean()) for k in ("aux_loss", "z_loss")})
    names = {p: n for n, p in model.named_parameters()}
    out = {"norms": norms, "losses": logged, "weights": {n: p.detach() for n, p in model.named_parameters()}}
    for key in ("exp_avg", "exp_avg_sq"):
        out[key] = {names[p]: s[key] for p, s in opt.state.items()}
    return out


def run_worker(tmp_path, world: int, stage: int, ep_size: int, profile: str = "default") -> dict:
    out = tmp_path / f"w{world}-z{stage}-e{ep_size}-{profile}.pt"
    h.run(["torchrun", "--standalone", "--nproc_per_node", str(world), "tests/ep_worker.py", str(stage),
           str(ep_size), str(out), profile], timeout=900)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("world,stage,ep_size", [(2, 1, 2), (2, 2, 2), (4, 2, 2), (4, 1, 4)])
def test_expert_parallel_training_equals_one_process(tmp_path, world, stage, ep_size):
    got, want = run_worker(tmp_path, world, stage, ep_size), reference(world)
    assert all(n > w.CLIP for n in want["norms"])  # clipping acts on every step
    assert got["norms"] == pytest.approx(want["norms"], abs=1e-5, rel=0)
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert got[key].keys() == want[key].keys()
        for name, value in want[key].items():
            torch.testing.assert_close(got[key][name], value, rtol=0, atol=1e-5, msg=f"{key} {name}")
    assert want["weights"]["model.layers.0.mlp.down_embed.weight"].shape[0] == 64
    assert got["stats"][0] == pytest.approx(group_statistics(world, ep_size), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_router_objective_is_the_same_for_any_expert_parallel_size(tmp_path, world):
    """E = world ranks against one process, 256 experts, top 8, aux and z-loss on, Adam eps 1e-8, 8
    steps: the same objective (logged aux_loss and z_loss equal the one-process values step by
    step) gives the same weights up to fp32 reduction order, which a routing flip would turn into
    a ~1e-3 jump of that layer's router and tables (measured when one occurs)."""
    got, want = run_worker(tmp_path, world, 2, world, "router"), reference(world, "router")
    for step_got, step_want in zip(got["losses"], want["losses"], strict=True):
        assert step_got == pytest.approx(step_want, rel=1e-5)
    assert want["losses"][0]["aux_loss"] > 0 and want["losses"][0]["z_loss"] > 0
    for name, value in want["weights"].items():
        bound = 2e-3 if name.endswith("_embed.weight") and ".mlp." in name else 1e-4
        assert ((got["weights"][name] - value).norm() / value.norm()).item() < bound, name


def moe_recipe() -> str:
    path = h.BASE / "ep-moe.yaml"
    path.write_text((h.REPO / "recipes" / "doge-tiny.yaml").read_text()
                    + "model_overrides: {is_moe: true, num_experts: 64, num_experts_per_tok: 4}\n")
    return str(path)


REFUSED = {
    "world": (lambda: ["--recipe", moe_recipe(), "--expert-parallel-size", "3", "--export", "false"],
              "= 3 does not divide the world size 2"),
    "dense": (lambda: ["--expert-parallel-size", "2", "--export", "false"], "needs a CDMoE model"),
    "zero3": (lambda: ["--recipe", moe_recipe(), "--expert-parallel-size", "2", "--export", "false",
                       "--deepspeed", "ds_configs/zero3.json"],
              "works with ZeRO-1 or ZeRO-2 without offload (ds_configs/zero1.json, ds_configs/zero2.json); "
              "--deepspeed ds_configs/zero3.json has stage 3"),
    "offload": (lambda: ["--recipe", moe_recipe(), "--expert-parallel-size", "2", "--export", "false",
                         "--deepspeed", "ds_configs/zero2_offload.json"], "has stage 2 with offload"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED))
def test_preflight_refuses_what_expert_parallelism_cannot_train(case):
    from test_train_preflight import assert_one_clean_line, lone_rank_of_two

    extra, message = REFUSED[case]
    rundir = h.BASE / f"ep-refused-{case}"
    data = h.prepared()
    args = extra()
    cmd = h.train_cmd(1, rundir, data, *args)
    if "--deepspeed" in args:  # the case's own config replaces the default one
        at = cmd.index("--deepspeed")
        del cmd[at:at + 2]
    done = h.run(cmd, expect_rc=2, timeout=120, **lone_rank_of_two())
    assert_one_clean_line(done, message)
    assert not rundir.exists()


@pytest.mark.slow
def test_trainer_runs_cdmoe_with_sharded_experts(tmp_path):
    """The trainer with E = 2 on 2 ranks: both ranks hold half the rows, router statistics are the
    group's, the checkpoint holds one expert file per shard and layer."""
    rundir = tmp_path / "run"
    h.run(h.train_cmd(2, rundir, h.prepared(), "--recipe", moe_recipe(), "--expert-parallel-size", "2",
                      "--max-steps", "4", "--decay-steps", "2", "--warmup-steps", "1", "--eval-interval", "4",
                      "--export", "false"))
    lines = h.train_lines(rundir)
    assert sorted(lines) == [1, 2, 3, 4]
    assert all(line["aux_loss"] > 0 and 0 < line["experts_used"] <= 1 for line in lines.values())
    step = rundir / "checkpoints" / "step-00000004"
    layers = json.loads((step / "trainer_state.json").read_text())["model_config"]["num_hidden_layers"]
    assert len(list(step.glob("layer_*_expert_*_model_states.pt"))) == layers * 2
