"""Full tensors from a ZeRO-1/2 checkpoint of a CDMoE model, expert shards included.

DeepSpeed's own tools stop at expert-parallel checkpoints (`ds_to_universal` crashes on them,
`zero_to_fp32` rejects their expert files), so CDMoE checkpoints go through this module: it reads
every rank's optimizer file, puts each parameter's fp32 weights and both Adam moments back
together, and writes either the full weights (for `doge.training.export`) or a DeepSpeed universal folder
that loads at any world size and expert-parallel size (for resume and `--init-from`).

How a ZeRO-1/2 file is laid out: optimizer group g is one flat buffer split over the ranks of its
data-parallel group; `param_slice_mappings[g]` says which piece (start, numel) of a rank's part
belongs to which parameter, in the same order on every rank. Dense groups span all W ranks in rank
order. An expert group (`"moe": True` in its settings) holds one shard of the tables: with expert
groups of E consecutive ranks, rank r holds rows of shard r % E, and the ranks r % E == e split
shard e between them in order r // E. Shard e is rows [e * N / E, (e + 1) * N / E) of the table.

The universal folder: `zero/NAME/{fp32,exp_avg,exp_avg_sq,step}.pt` per parameter, with the expert
tables full and marked (`is_expert_param`, `ep_num_experts`) so DeepSpeed slices each rank's rows
on load; each table is listed under both names it can have (`mlp.down_embed.weight` unsharded,
`mlp.deepspeed_moe.experts.deepspeed_experts.0.down_embed.weight` sharded; hard links, no extra
bytes), so one folder serves every target size. DeepSpeed copies optimizer group settings by
position; the folder lists the dense groups, then the expert group's settings without its `name`
and `moe` keys, which stay the target's own (an unsharded target has no third group).
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from doge.training.checkpoint import TrainerState

SHARD_PREFIX = "deepspeed_moe.experts.deepspeed_experts.0."
TABLES = ("mlp.down_embed.weight", "mlp.up_embed.weight")
MOMENTS = ("exp_avg", "exp_avg_sq")
_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


@dataclass
class FullState:
    """Every trained parameter under its unsharded name: fp32 weights and both Adam moments."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # moment -> name -> tensor
    step: object = None  # Adam's step count as DeepSpeed stored it
    groups: list[dict] = field(default_factory=list)  # optimizer group settings, params left out
    global_state: dict = field(default_factory=dict)  # loss scaler, clip_grad, ds_version

    def expert_names(self) -> set[str]:
        """The CDMoE tables, which a target with E > 1 shards (however the source held them)."""
        return {name for name in self.weights if name.endswith(TABLES)}


def unsharded_name(name: str) -> str:
    return name.replace(SHARD_PREFIX, "")


def sharded_name(name: str) -> str:
    """`...mlp.down_embed.weight` -> `...mlp.deepspeed_moe.experts.deepspeed_experts.0.down_embed.weight`."""
    head, _, leaf = name.rpartition(".mlp.")
    return f"{head}.mlp.{SHARD_PREFIX}{leaf}"


def handles(ckpt: Path) -> bool:
    """True for ZeRO-1/2 checkpoints of CDMoE models (ZeRO-3 writes per-rank model states)."""
    return (bool(TrainerState.read(ckpt).model_config.get("is_moe"))
            and not any(ckpt.glob("zero_pp_rank_*_model_states.pt")))


def _rank_files(ckpt: Path) -> list[dict]:
    found = {int(m.group(1)): p for p in ckpt.iterdir() if (m := _OPTIM_FILE.fullmatch(p.name))}
    if sorted(found) != list(range(len(found))) or not found:
        raise RuntimeError(f"{ckpt}: ZeRO optimizer files found for ranks {sorted(found)}, not for every rank "
                           "0..W-1: restore the missing file or use an earlier checkpoint")
    return [torch.load(found[r], map_location="cpu", weights_only=False)["optimizer_state_dict"]
            for r in range(len(found))]


def _shapes(ckpt: Path) -> dict[str, torch.Size]:
    model_states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {name: torch.Size(shape) for group in model_states["param_shapes"] for name, shape in group.items()}


def _gather(parts: list[dict], g: int, ranks: list[int], shapes: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Group g's parameters over `ranks` (in partition order): name -> {fp32, exp_avg, exp_avg_sq}."""
    pieces: dict[str, dict[str, list]] = {}
    for r in ranks:
        flat = {"fp32": parts[r]["single_partition_of_fp32_groups"][g],
                **{k: parts[r]["base_optimizer_state"]["state"][g][k] for k in MOMENTS}}
        for name, frag in parts[r]["param_slice_mappings"][g].items():
            slot = pieces.setdefault(name, {k: [] for k in flat})
            for key, tensor in flat.items():
                slot[key].append(tensor.narrow(0, frag.start, frag.numel))
    return {name: {k: torch.cat(v).view(shapes[name]).clone() for k, v in slot.items()}
            for name, slot in pieces.items()}


def read(ckpt: Path) -> FullState:
    """The full fp32 state of a ZeRO-1/2 checkpoint (any world size, any expert-parallel size)."""
    ckpt = Path(ckpt)
    state = TrainerState.read(ckpt)
    ep = int(state.recipe.get("expert_parallel_size", 1))
    parts, shapes = _rank_files(ckpt), _shapes(ckpt)
    world = len(parts)
    out = FullState(global_state={k: v for k, v in parts[0].items() if k in (
        "loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "ds_version")})
    shards: dict[str, list[dict]] = {}
    for g, settings in enumerate(parts[0]["base_optimizer_state"]["param_groups"]):
        out.groups.append({k: v for k, v in settings.items() if k != "params"})
        out.step = parts[0]["base_optimizer_state"]["state"][g].get("step", out.step)
        if not settings.get("moe"):
            _merge(out, _gather(parts, g, list(range(world)), shapes))
            continue
        for e in range(ep):
            for name, tensors in _gather(parts, g, list(range(e, world, ep)), shapes).items():
                shards.setdefault(unsharded_name(name), []).append(tensors)
    for name, per_shard in shards.items():
        _merge(out, {name: {k: torch.cat([s[k] for s in per_shard]) for k in per_shard[0]}})
    return out


def _merge(out: FullState, params: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, tensors in params.items():
        out.weights[name] = tensors["fp32"]
        for key in MOMENTS:
            out.moments.setdefault(key, {})[name] = tensors[key]


def write_universal(ckpt: Path, out: Path) -> None:
    """A DeepSpeed universal checkpoint of `ckpt` in the (new, empty) folder `out`."""
    full = read(ckpt)
    zero, tables = out / "zero", full.expert_names()
    for name, weight in full.weights.items():
        folder = zero / name
        folder.mkdir(parents=True)
        expert = {"is_expert_param": True, "ep_num_experts": weight.shape[0]} if name in tables else {}
        torch.save({"param": weight, **expert}, folder / "fp32.pt")
        for key in MOMENTS:
            torch.save({"param": full.moments[key][name], **expert}, folder / f"{key}.pt")
        if full.step is not None:
            torch.save(full.step, folder / "step.pt")
        if expert:
            _link_tree(folder, zero / sharded_name(name))
    dense = [g for g in full.groups if not g.get("moe")]
    experts = [{k: v for k, v in g.items() if k not in ("name", "moe")} for g in full.groups if g.get("moe")]
    torch.save({**full.global_state, "param_groups": dense + experts[:1]}, zero / "optimizer_state.pt")
    shutil.copy2(ckpt / "mp_rank_00_model_states.pt", out / "mp_rank_00_model_states.pt")


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for file in src.iterdir():
        try:
            os.link(file, dst / file.name)
        except OSError:  # a filesystem without hard links
            shutil.copy2(file, dst / file.name)
