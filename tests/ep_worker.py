"""One rank of an expert-parallel training run for the tests: a tiny CDMoE model sharded with
`expert_parallel.apply`, trained by a DeepSpeed ZeRO-1/2 engine for a few steps on fixed random
batches (rank r takes rows r*micro .. of each global batch); rank 0 writes the full weights, both
Adam moments (shards gathered, keys as in the unsharded model), the grad norms and the router
statistics to a file the test compares with a single-process run. The `router` profile trains the
router objective harder: 256 experts, top 8, 8 steps, z-loss on, and the trainer's Adam eps 1e-8;
rank 0 then also writes each step's rank-mean aux_loss and z_loss, as the trainer logs them.

`load` mode: rank 0 writes the same tensors (and each optimizer group's name and weight decay) of a
trainer checkpoint loaded the way the trainer loads it, at this launch's world size and EP_SIZE:
directly at the size it was written with, else through the universal conversion. The engine is
built with weight decay 0.5, so the groups show whether the checkpoint's settings came back.

usage: torchrun --nproc_per_node W tests/ep_worker.py STAGE EP_SIZE OUT [router]
       torchrun --nproc_per_node W tests/ep_worker.py load CKPT EP_SIZE OUT
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from conftest import tiny_config

from doge import DogeConfig, DogeForCausalLM
from doge.training import expert_parallel
from doge.training.checkpoint import TrainerState
from doge.training.distributed import init_distributed
from doge.training.engine import _try_load, build_engine, param_groups
from doge.training.lm_loss import causal_lm_loss
from doge.training.objective import TrainedModel

MOE = dict(is_moe=True, num_experts=64, num_experts_per_tok=4, router_aux_loss_coef=0.01)
STEPS, MICRO, SEQ, LR, WD, CLIP = 5, 2, 16, 1e-3, 0.1, 0.5
# Adam's m / (sqrt(v) + eps) turns fp32 reduction-order noise in near-zero gradients into
# update-sized differences when sqrt(v) << eps; this eps keeps such elements comparable at 1e-5.
EPS = 1e-6
PROFILES = {
    "default": dict(moe=MOE, steps=STEPS, eps=EPS),
    "router": dict(moe=dict(MOE, num_experts=256, num_experts_per_tok=8, router_z_loss_coef=0.01), steps=8,
                   eps=1e-8),
}


def batches(world: int, profile: str = "default") -> torch.Tensor:
    """(steps, world * MICRO, SEQ) token ids, the same on every rank and in the reference."""
    steps = PROFILES[profile]["steps"]
    return torch.randint(0, 256, (steps, world * MICRO, SEQ), generator=torch.Generator().manual_seed(1))


def fresh_model(profile: str = "default") -> DogeForCausalLM:
    torch.manual_seed(0)
    return DogeForCausalLM(tiny_config(**PROFILES[profile]["moe"]))


def ds_config(stage: int, world: int, profile: str = "default") -> dict:
    eps = PROFILES[profile]["eps"]
    return {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": 1, "gradient_clipping": CLIP, "bf16": {"enabled": False},
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": eps,
                                                      "weight_decay": WD, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}


def full_tensors(model, names: dict, tensors: dict, group) -> dict:
    """Expert shards gathered over the expert group (rows in group-rank order), keys unsharded."""
    out = {}
    for param, value in tensors.items():
        name = names[param]
        if ".deepspeed_moe." in name:
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts)
            name = name.replace("deepspeed_moe.experts.deepspeed_experts.0.", "")
        out[name] = value.detach().clone()
    return out


def adam_moments(optimizer, key: str) -> dict:
    """param -> its `key` moment, from ZeRO-1/2's flat fp32 partitions (gathered over each group's
    data-parallel group, then cut at the parameters' offsets in the flat buffer)."""
    out = {}
    for i, params in enumerate(optimizer.round_robin_bit16_groups):
        part = optimizer.optimizer.state[optimizer.single_partition_of_fp32_groups[i]][key]
        group = optimizer.real_dp_process_group[i]
        pieces = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, part, group=group)
        flat, offset = torch.cat(pieces), 0
        for p in params:
            out[p] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    return out


def main(stage: int, ep_size: int, out: str, profile: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = fresh_model(profile)
    group = expert_parallel.apply(model, ep_size)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(stage, world, profile),
                                      model_parameters=expert_parallel.optimizer_groups(param_groups(model, WD)))
    norms, stats, losses = [], [], []
    for ids in batches(world, profile):
        mine = ids[rank * MICRO:(rank + 1) * MICRO]
        loss, metrics = causal_lm_loss(TrainedModel(engine, model.config, group), mine, mine)
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))
        stats.append({k: float(metrics[k]) for k in ("experts_used", "max_load")})
        logged = torch.stack([metrics["aux_loss"], metrics["z_loss"]])
        dist.all_reduce(logged)  # the trainer's rank mean of the micro-batch values
        losses.append(dict(zip(("aux_loss", "z_loss"), (logged / world).tolist())))
    dump(engine, group, out, {"norms": norms, "stats": stats, "losses": losses})


def dump(engine, group, out: str, result: dict) -> None:
    """Rank 0 saves `result` plus the full weights and both Adam moments; every rank shuts down."""
    model = engine.module
    names = {p: n for n, p in model.named_parameters()}
    result["weights"] = full_tensors(model, names, {p: p.data for p in model.parameters()}, group)
    for key in ("exp_avg", "exp_avg_sq"):
        result[key] = full_tensors(model, names, adam_moments(engine.optimizer, key), group)
    if dist.get_rank() == 0:
        torch.save(result, out)
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()


def load(ckpt: Path, ep_size: int, out: str) -> None:
    dist_info = init_distributed()
    world = dist_info.world
    state = TrainerState.read(ckpt)
    reshard = (state.world_size, state.recipe["expert_parallel_size"]) != (world, ep_size)
    config = ds_config(2, world)
    config["checkpoint"] = {"load_universal": reshard}
    engine = build_engine(DogeConfig(**state.model_config), config, 0.5, 0, None, ep_size)
    scratch = Path(out).with_suffix(".universal")  # one folder all ranks see
    plan = SimpleNamespace(reshard=reshard, rundir=scratch, start=SimpleNamespace(resumed=False, source_state=state))
    error = _try_load(engine, plan, ckpt, dist_info)
    assert error is None, error
    groups = [(g["name"], g["weight_decay"]) for g in engine.optimizer.param_groups]
    dump(engine, expert_parallel.expert_group(ep_size), out, {"groups": groups})


if __name__ == "__main__":
    if sys.argv[1] == "load":
        load(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "default")
