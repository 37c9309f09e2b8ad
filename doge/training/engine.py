"""The DeepSpeed engine: the model, its named parameter groups, and loading a start point.

Parameter groups carry a `name` ("decay" / "no_decay"): weight decay applies to matrices and
embedding tables only, never to norms, biases, residual scales or DMA's `A`; names also let
DeepSpeed split groups further (its expert-parallel groups are split by name).
"""
from __future__ import annotations

from pathlib import Path

import torch

from doge.model.configuration import DogeConfig
from doge.model.modeling import DogeForCausalLM
from doge.training import checkpoint as ckpt
from doge.training.compile import compile_model
from doge.training.distributed import Dist, all_reduce_sum
from doge.training.preflight import Plan
from doge.training.recipe import ConfigError
from doge.training.universal import to_universal

# What CDMoE adds to a dense model (and upcycling starts fresh): the router and the expert tables.
EXPERT_PARAMETERS = ("router_gate", "down_embed", "up_embed")


def param_groups(model: torch.nn.Module, weight_decay: float, expert_lr_scale: float = 1.0) -> list[dict]:
    """"decay" and "no_decay"; with `expert_lr_scale` != 1 the CDMoE router and expert tables get
    groups of their own ("decay_experts", ...) whose LR is the schedule's times `lr_scale` (`set_lr`)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"name": "decay", "params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    if expert_lr_scale == 1.0:
        return groups
    experts = {p for n, p in named if any(key in n for key in EXPERT_PARAMETERS)}
    split = []
    for group in groups:
        own = [p for p in group["params"] if p in experts]
        split.append({**group, "params": [p for p in group["params"] if p not in experts]})
        if own:
            split.append({**group, "name": group["name"] + "_experts", "params": own, "lr_scale": expert_lr_scale})
    return split


def build_engine(config: DogeConfig, ds_config: dict, weight_decay: float, seed: int, weights: Path | None = None,
                 expert_parallel_size: int = 1, upcycle_from: DogeConfig | None = None, *,
                 compiled: bool = False, dynamic_length: bool = False, checkpointing: bool = False,
                 expert_lr_scale: float = 1.0):
    """A freshly initialised model (seeded), or one holding `weights` (an HF export or a checkpoint;
    with `upcycle_from`, the weights of that dense model, upcycled to `config`), wrapped in a
    DeepSpeed engine with a fresh optimizer; CDMoE expert tables sharded over `expert_parallel_size`
    ranks (the full model is built on every rank first, so every shard starts as its rows of it).
    `compiled`: decoder layers and LM head through torch.compile (`dynamic_length`: micro-batches
    of varying length); `checkpointing`: each decoder layer's activations recomputed in backward;
    `expert_lr_scale`: LR multiplier of the CDMoE router and expert tables."""
    import deepspeed

    from doge.model.upcycle import upcycle
    from doge.training import expert_parallel
    from doge.training.weights import load_weights

    torch.manual_seed(seed)
    model = DogeForCausalLM(upcycle_from or config)
    if weights is not None:
        load_weights(model, weights)
    if upcycle_from is not None:
        model = upcycle(model, config)
    expert_parallel.apply(model, expert_parallel_size)
    if checkpointing:  # non-reentrant: works with compiled layers and with ZeRO's gradient hooks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compiled:  # ZeRO-3 gathers each submodule's parameters in hooks a graph cannot hold
        compile_model(model, dynamic_length, fullgraph=ds_config.get("zero_optimization", {}).get("stage", 0) != 3)
    groups = expert_parallel.optimizer_groups(param_groups(model, weight_decay, expert_lr_scale))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    guard_on_device(engine)
    return engine


def guard_on_device(engine) -> None:
    """Clip gradients and skip non-finite updates without reading the gradient norm back.

    DeepSpeed's ZeRO-1/2 optimizer decides on the host whether a step's norm is finite, both to
    skip the step and before clipping: a device sync every optimizer step. bf16 runs with
    `check_grad_overflow: false` (the shipped ds_configs) skip the first; this takes over the
    second. The inner torch AdamW, fused, is handed before each of its steps the gradients clipped
    by DeepSpeed's own rule and `found_inf` = (norm not finite): its kernel then leaves weights,
    moments and step count untouched, all on the device. The norm is DeepSpeed's
    `_global_grad_norm`, set just before it calls the inner step (deepspeed 0.19); an invalid norm
    is the sentinel -1 there. DeepSpeed marks that sentinel with a device tensor as fill value,
    which `masked_fill_` reads back to the host: the same marking with a plain number replaces it."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", None)
    if getattr(zero, "check_grad_overflow", True) or zero.dtype != torch.bfloat16 or not isinstance(
            inner, torch.optim.AdamW):
        return
    if not inner.defaults.get("fused"):
        raise ConfigError("bf16.check_grad_overflow is false in the DeepSpeed config but the optimizer is not "
                          "torch's fused AdamW, which would then apply non-finite updates: set "
                          '"fused": true in optimizer.params (with "torch_adam": true) or check_grad_overflow true')
    from deepspeed.runtime.zero import stage_1_and_2

    stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mark_invalid_norm
    clip, zero.clip_grad = zero.clip_grad, 0.0  # DeepSpeed no longer clips (nor reads the norm to do so)
    step = inner.step

    def guarded_step(*args, **kwargs):
        norm = zero._global_grad_norm
        inner.found_inf = (~torch.isfinite(norm) | (norm < 0)).float()
        if clip > 0:
            scale = torch.clamp((norm + 1e-6) / clip, min=1.0)  # DeepSpeed's rule, on the device
            grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / scale)
        return step(*args, **kwargs)

    inner.step = guarded_step


def _mark_invalid_norm(norm: torch.Tensor, device=None, val: float = -1.0) -> None:
    """A non-finite norm becomes `val` in place (DeepSpeed's rule), filled with a plain number."""
    norm.masked_fill_(~torch.isfinite(norm), val)


def load_start(engine, plan: Plan, dist: Dist) -> Path:
    """Load engine state from the plan's checkpoint, through a universal copy when the world size or
    the expert-parallel size changed; a resume of the same world size also restores each rank's RNG streams. A resumed
    checkpoint that fails to load is moved to `broken/` and the previous complete one of the same
    world size is tried. Returns the checkpoint loaded."""
    candidates = [plan.start.source]
    if plan.start.resumed:
        older = reversed(ckpt.complete_checkpoints(plan.start.source.parent))
        candidates += [c for c in older if c < plan.start.source and
                       ckpt.TrainerState.read(c).world_size == plan.start.source_state.world_size]
    for source in candidates:
        error = _try_load(engine, plan, source, dist)
        if error is None:
            return source
        if dist.is_main:
            where = ckpt.move_aside(source) if plan.start.resumed else source
            print(f"checkpoint {source} failed to load ({error}); moved to {where}"
                  + ("; falling back to the previous complete checkpoint" if source != candidates[-1] else ""),
                  flush=True)
    raise ConfigError(f"no checkpoint could be loaded (the last tried was {candidates[-1]}); see the lines above: "
                      "restore its files or start a new --output")


def _try_load(engine, plan: Plan, source: Path, dist: Dist) -> str | None:
    """Load `source` on every rank; None if every rank succeeded, else what went wrong."""
    load_dir, error = source, None
    if plan.reshard:
        out_root = plan.rundir / ("checkpoints/universal" if plan.start.resumed else "init-universal")
        if dist.is_main:
            try:
                to_universal(source, out_root)
            except RuntimeError as err:
                error = str(err)
        load_dir = out_root / source.name
    if _any_rank_failed(error, engine.device):  # also the barrier before loading the universal copy
        return error or "the universal conversion failed on rank 0"
    try:
        path, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_lr_scheduler_states=False)
        if path is None:
            error = f"DeepSpeed found nothing to load in {load_dir}"
        elif plan.start.resumed and plan.start.source_state.world_size == dist.world:
            ckpt.restore_rng(source, dist.rank)
    except Exception as err:  # noqa: BLE001 -- DeepSpeed and torch.load raise anything (a bare AssertionError, ...)
        error = f"{type(err).__name__}: {err}".splitlines()[0]
    return (error or "another rank failed to load it") if _any_rank_failed(error, engine.device) else None


def _any_rank_failed(error: str | None, device) -> bool:
    flag = torch.tensor([float(error is not None)], device=device)
    all_reduce_sum(flag)
    return flag.item() > 0


def set_lr(engine, lr: float) -> None:
    """The schedule's LR on every group, times the group's `lr_scale` (see `param_groups`)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
