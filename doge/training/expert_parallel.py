"""Expert parallelism for CDMoE: each layer's expert tables split by rows over an expert group.

`apply(model, E)` turns every `DogeCDMoE` of a model into an `ExpertParallelCDMoE` after the model
is built and before DeepSpeed sees it; `cdmoe.py`, generation and export stay single-device. Ranks
r*E .. r*E+E-1 form an expert group (DeepSpeed's `ep_size_E` group); rank i of a group holds rows
[i*N/E, (i+1)*N/E) of `down_embed` and `up_embed`. Each rank still routes its own tokens (the router
and the shared SwiGLU expert are replicated), so routing stays per token and causal. The routed part:

1. all-gather the group's hidden states, routing weights and expert ids (every rank then sees the
   E micro-batches of its group);
2. each rank sums, for every gathered token, the pairs (token, slot) whose expert is one of its rows;
3. a reduce-scatter adds the E partial sums and hands each rank its own tokens' outputs.

Both collectives are autograd functions whose backward is the other one, so gradients are exact:
a shard's gradient is the sum over the whole group's tokens. They use `all_gather_into_tensor` /
`reduce_scatter_tensor` (deprecated names in torch 2.13, the only ones before it); every rank of a
group must pass the same number of tokens (equal micro-batch shapes, as the objectives produce).

What DeepSpeed 0.19 needs, and why the module looks the way it does:
- A parameter is an expert parameter when `param.allreduce is False`; its gradient is reduced over
  the expert-data-parallel group `param.group_name` only, and ZeRO-1/2 then divide by the full
  data-parallel size. The local shard gradient is already the sum over the expert group (step 3's
  backward), so the result is the mean over all ranks, as for every other parameter.
- The engine switches this handling on only when some submodule is an instance of
  `deepspeed.moe.layer.MoE`; marked parameters without one crash ZeRO-1/2. `ExpertParallelCDMoE`
  is such an instance without running `MoE.__init__` (it sets the attributes the engine reads:
  `num_experts`, `ep_size`, `expert_group_name`, `num_local_experts`).
- Expert checkpoint files are written only for state-dict keys under
  `.deepspeed_moe.experts.deepspeed_experts.<i>` (and keys are routed by the substring `expert`), so
  the shard lives at `deepspeed_moe.experts.deepspeed_experts.0` (one DeepSpeed "expert" per rank).
- The optimizer groups must be split by `split_params_into_different_moe_groups_for_optimizer`, which
  needs every group to carry a `name`.
- ZeRO-1/2 compute the expert part of the gradient norm over the full data-parallel group, so the
  logged and clipped norm covers every shard once.
- ZeRO-3 refuses `MoE` modules, and offload / ZeRO-0 do not reduce by `group_name`: preflight only
  lets E > 1 through with ZeRO-1 or ZeRO-2 without offload.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from doge.model.cdmoe import DogeCDMoE, DogeMLP


class _GatherFromGroup(torch.autograd.Function):
    """(T, ...) per rank -> (E*T, ...) in group-rank order; backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatterToGroup(torch.autograd.Function):
    """(E*T, ...) partial sums per rank -> this rank's (T, ...) total; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _GatherFromGroup.forward(ctx, grad, ctx.group), None


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


def gather_ids(ids: torch.Tensor, group) -> torch.Tensor:
    out = ids.new_empty((dist.get_world_size(group) * ids.shape[0], *ids.shape[1:]))
    dist.all_gather_into_tensor(out, ids.contiguous(), group=group)
    return out


class ExpertShard(nn.Module):
    """This rank's rows of the two expert tables (one DeepSpeed 'expert')."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, group_name: str):
        super().__init__()
        self.down_embed = nn.Embedding.from_pretrained(down, freeze=False)
        self.up_embed = nn.Embedding.from_pretrained(up, freeze=False)
        for p in self.parameters():
            p.allreduce, p.group_name = False, group_name


class _Experts(nn.Module):
    def __init__(self, shard: ExpertShard):
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([shard])


class _Holder(nn.Module):
    def __init__(self, shard: ExpertShard):
        super().__init__()
        self.experts = _Experts(shard)


class ExpertParallelCDMoE(DogeCDMoE, MoE):
    """A `DogeCDMoE` whose routed tables are row shards exchanged inside the expert group."""

    @classmethod
    def convert(cls, layer: DogeCDMoE, ep_size: int, group_name: str, group, group_rank: int) -> None:
        """In place: `layer` keeps its shared expert and router (same parameters, same names) and
        trades its full tables for this rank's rows under `deepspeed_moe.experts.deepspeed_experts.0`."""
        rows = layer.num_experts // ep_size
        lo = group_rank * rows
        shard = ExpertShard(layer.down_embed.weight.data[lo:lo + rows].clone(),
                            layer.up_embed.weight.data[lo:lo + rows].clone(), group_name)
        del layer.down_embed, layer.up_embed
        layer.__class__ = cls
        layer.deepspeed_moe = _Holder(shard)
        layer.ep_size, layer.expert_group_name, layer.num_local_experts = ep_size, group_name, 1
        layer.ep_group, layer.first_row = group, lo

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The groups exist already (`apply` created them); nothing to do."""

    @property
    def shard(self) -> ExpertShard:
        return self.deepspeed_moe.experts.deepspeed_experts[0]

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        router_logits, weights, experts = self.route(flat)
        tokens = _GatherFromGroup.apply(flat, self.ep_group)
        weights = _GatherFromGroup.apply(weights, self.ep_group)
        rows = gather_ids(experts, self.ep_group) - self.first_row
        mine = (rows >= 0) & (rows < self.shard.down_embed.num_embeddings)  # pairs this shard serves
        rows = torch.where(mine, rows, 0)  # fixed shapes (no nonzero): other shards' pairs get gate 0
        down = F.embedding(rows, self.shard.down_embed.weight)  # (E*T, k, hidden)
        gates = self.act_fn(torch.bmm(down.to(flat.dtype), tokens.unsqueeze(-1)).squeeze(-1)) * weights * mine
        partial = F.embedding_bag(rows, self.shard.up_embed.weight, mode="sum",
                                  per_sample_weights=gates.to(self.shard.up_embed.weight.dtype)).to(flat.dtype)
        routed = _ReduceScatterToGroup.apply(partial, self.ep_group)
        return DogeMLP.forward(self, x) + routed.view_as(x), router_logits


def apply(model: nn.Module, ep_size: int):
    """Shard every CDMoE layer of `model` over expert groups of `ep_size` ranks (the process group
    must exist; every rank must hold the same full model). Returns the expert group, or None for 1."""
    if ep_size == 1:
        return None
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(ep_size)
    group = expert_group(ep_size)
    group_rank = dist.get_rank(group)
    for module in list(model.modules()):
        if isinstance(module, DogeCDMoE):
            ExpertParallelCDMoE.convert(module, ep_size, _group_name(ep_size), group, group_rank)
    return group


def _group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def expert_group(ep_size: int):
    """The expert group of `apply(model, ep_size)` (DeepSpeed keeps it by name), or None for 1: the
    loop hands it to the objective, whose router statistics add up the group's token counts."""
    if ep_size == 1:
        return None
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(_group_name(ep_size))


def optimizer_groups(groups: list[dict]) -> list[dict]:
    """Named parameter groups with the expert shards split into groups of their own (DeepSpeed
    reduces and partitions those over the expert-data-parallel group); unchanged without shards."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if not any(is_moe_param(p) for g in groups for p in g["params"]):
        return groups
    return split_params_into_different_moe_groups_for_optimizer(groups)
