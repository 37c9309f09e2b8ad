"""Everything that can be checked before a process group starts, in one place.

Each rank runs `preflight` right after parsing its command line and before DeepSpeed is touched:
the recipe's fields (already checked by `Recipe.load`), the WSD phases against `max_steps`, the
batch geometry against the world size the launcher exported, the DeepSpeed config's "auto"
values, the start point (own checkpoint, `--init-from`) and the data against the model and the
checkpoint. What a resume must keep is checked here for every objective, as the objective
declares it: the model and the recipe fields in `Objective.resume_fields` (e.g. DPO's beta and its
frozen reference's weights) before any data is opened, the data's fingerprint once it is. Fields
that follow from the data or the model (`Objective.resolve`: a chat run's seq_len, DPO's
reference fingerprint) are filled in first. Any failure is a `ConfigError`;
the command line turns it into one `error: ...` line and exit code 2 on every launcher, and no
rank has started a process group or an engine.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from doge.model.configuration import PRESETS, DogeConfig
from doge.training import checkpoint as ckpt
from doge.training import downstream, runlock
from doge.training.accelerator import device_type, use_bf16
from doge.training.compile import compile_wanted
from doge.training.distributed import rank_from_env
from doge.training.ds_config import fill as fill_ds_config
from doge.training.objective import Objective
from doge.training.recipe import ConfigError, Recipe, flag
from doge.training.schedule import WSD


@dataclass
class Plan:
    """A checked run, ready to start: what the loop and the engine are built from."""

    recipe: Recipe
    rundir: Path
    world: int
    start: Start  # the checkpoint or fresh weights the run starts from, and the model it trains
    objective: Objective
    schedule: WSD
    global_batch: int  # samples per optimizer step, all ranks
    grad_accum: int
    ds_config: dict
    bf16: bool
    compiled: bool  # decoder layers and LM head through torch.compile
    reshard: bool = False  # the source was written at another world size or expert-parallel size
    lock_note: str | None = None  # a stale lock taken over


def schedule_of(recipe: Recipe) -> WSD:
    try:
        return WSD(recipe.lr, recipe.warmup_steps, recipe.decay_steps, recipe.max_steps, recipe.decay_shape,
                   recipe.min_lr_ratio, recipe.decay_start)
    except ValueError as err:
        raise ConfigError(f"learning-rate schedule: {err}") from err


def schedule_from_epochs(recipe: Recipe, epochs: float, per_epoch: int, global_batch: int) -> WSD:
    """max_steps from --epochs and the data's size, then the schedule; an error names --epochs."""
    recipe.max_steps = max(1, math.ceil(epochs * per_epoch / global_batch))
    try:
        return schedule_of(recipe)
    except ConfigError as err:
        raise ConfigError(f"--epochs {epochs:g} of {per_epoch} examples at {global_batch} per step gives max_steps "
                          f"{recipe.max_steps}; {str(err).replace('raise --max-steps', 'raise --epochs')}") from err


def batch_geometry(recipe: Recipe, world: int) -> tuple[int, int]:
    """(global batch in samples, gradient accumulation steps)."""
    if recipe.global_batch_tokens % recipe.seq_len:
        raise ConfigError(f"--global-batch-tokens {recipe.global_batch_tokens} is not a multiple of --seq-len "
                          f"{recipe.seq_len}")
    global_batch = recipe.global_batch_tokens // recipe.seq_len
    if global_batch % (recipe.micro_batch_size * world):
        raise ConfigError(f"global batch of {global_batch} samples is not divisible by --micro-batch-size "
                          f"{recipe.micro_batch_size} x world size {world}; choose --global-batch-tokens as a "
                          f"multiple of {recipe.seq_len * recipe.micro_batch_size * world}")
    return global_batch, global_batch // (recipe.micro_batch_size * world)


def resolve_start(rundir: Path, recipe: Recipe) -> tuple[Path | None, ckpt.TrainerState | None, list]:
    """The checkpoint to load (own newest complete one, else --init-from), its trainer state, and
    the run's incomplete checkpoints with the reason each is skipped."""
    complete, skipped = ckpt.scan(rundir / "checkpoints")
    if complete:
        own = complete[-1]
        if recipe.resume == "never":
            raise ConfigError(f"--output {rundir} already holds checkpoint {own.name} and --resume is never: "
                              "choose a new --output or drop --resume never")
        return own, ckpt.TrainerState.read(own), skipped
    if skipped:
        folder, reason = skipped[-1]
        raise ConfigError(f"{folder} is not a complete checkpoint ({reason}) and {rundir / 'checkpoints'} holds no "
                          "complete one to resume from: restore the file, or move the folder away to start afresh")
    init_from = recipe.init_from or (recipe.model if (Path(recipe.model) / ckpt.STATE_FILE).is_file() else None)
    if init_from:
        source = Path(init_from)
        if not (source / ckpt.STATE_FILE).is_file():
            raise ConfigError(f"--init-from {source}: not a complete checkpoint (no {ckpt.STATE_FILE}); "
                              "pass a RUNDIR/checkpoints/step-XXXXXXXX folder")
        reason = ckpt.incomplete_reason(source)
        if reason:
            raise ConfigError(f"--init-from {source}: not a complete checkpoint ({reason}); pass another one")
        return source, ckpt.TrainerState.read(source), []
    return None, None, []


def check_same_model(recipe: Recipe, state: ckpt.TrainerState, own: Path) -> None:
    """A resume continues the checkpoint's weights: a --model or model_overrides that differs from
    the one the run was started with is refused, not silently replaced by the checkpoint's."""
    trained = (state.recipe.get("model"), state.recipe.get("model_overrides") or {})
    if "model" in state.recipe and trained != (recipe.model, recipe.model_overrides or {}):
        raise ConfigError(f"--model {recipe.model} (model_overrides {recipe.model_overrides or {}}) differs from "
                          f"checkpoint {own}, trained as --model {trained[0]} (model_overrides {trained[1]}): "
                          "resume with the run's own --model/recipe, or choose a new --output (--init-from "
                          f"{own} starts a new run from these weights)")


def check_resume(recipe: Recipe, objective_cls: type[Objective], start: Start) -> None:
    """A resume continues the checkpoint's run: its model and the recipe fields its objective
    declares (`Objective.resume_fields`) keep the values the run was started with (a field the
    checkpoint predates is not compared)."""
    if not start.resumed:
        return
    state, own = start.source_state, start.source
    check_same_model(recipe, state, own)
    fields = {f.name: f for f, _ in type(recipe).fields()}
    for name in objective_cls.resume_fields:
        ours, theirs = getattr(recipe, name), state.recipe.get(name, getattr(recipe, name))
        if fields[name].metadata["derived"]:  # set by the run (Objective.resolve), not by a flag
            if None not in (ours, theirs) and ours != theirs:
                raise ConfigError(f"--model {recipe.model}: the {fields[name].metadata['help']} is now {ours}, but "
                                  f"checkpoint {own} was trained against {theirs}: the files at --model were replaced "
                                  "since the run started; restore the run's own --model, or choose a new --output "
                                  f"(--init-from {own} starts a new run from these weights)")
        elif ours != theirs:
            raise ConfigError(f"{flag(name)} = {ours} differs from checkpoint {own}, trained with {name} = {theirs}: "
                              f"resume with the run's own value ({theirs}), or choose a new --output (--init-from "
                              f"{own} starts a new run from these weights)")


def check_same_data(data: str, objective: Objective, start: Start) -> None:
    """A resume must see the data it was trained on; a continuation at least its tokenizer."""
    source = start.source_state
    if source is None:
        return
    if start.resumed and source.data_fingerprint != objective.fingerprint:
        raise ConfigError(f"--data {data} is not the data this run was trained on (fingerprint "
                          f"{objective.fingerprint} != {source.data_fingerprint}): pass the original --data and "
                          "--seq-len, or start a new --output with --init-from to continue on new data")
    if source.tokenizer_fingerprint != objective.tokenizer_fingerprint:
        raise ConfigError(f"--data {data} uses tokenizer {objective.tokenizer_fingerprint} but the checkpoint "
                          f"was trained with {source.tokenizer_fingerprint}: prepare the data with the "
                          "checkpoint's tokenizer (its tokenizer/ folder)")


def check_zero_stage(path: str, ds_config: dict, source: Path) -> None:
    """DeepSpeed cannot load a ZeRO-3 checkpoint (per-rank model states) into stage 0-2 or back."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    partitioned = any(source.glob("zero_pp_rank_*_model_states.pt"))
    if (stage == 3) != partitioned:
        raise ConfigError(f"--deepspeed {path} uses ZeRO stage {stage} but checkpoint {source} was written with "
                          f"ZeRO stage {'3' if partitioned else '1 or 2'}: use a ZeRO-"
                          f"{'3' if partitioned else '2'} config (e.g. ds_configs/{'zero3' if partitioned else 'zero2'}"
                          ".json)")


def check_expert_parallel(recipe: Recipe, path: str, ds_config: dict, config: DogeConfig, world: int) -> None:
    """E > 1 shards each CDMoE layer's expert tables over E ranks (doge.training.expert_parallel): it
    needs CDMoE layers with a multiple of E experts, E dividing the world size, and ZeRO-1/2 without
    offload (ZeRO-3 refuses DeepSpeed's MoE modules; ZeRO-0 and offload do not reduce expert
    gradients over their group)."""
    ep, name = recipe.expert_parallel_size, flag("expert_parallel_size")
    if ep == 1:
        return
    zero = ds_config.get("zero_optimization", {})
    offload = any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param"))
    problems = [(world % ep, f"does not divide the world size {world}: choose a divisor of {world}"),
                (not config.is_moe, "needs a CDMoE model (model_overrides {is_moe: true}); dense models have no "
                                    "experts to shard"),
                (config.is_moe and config.num_experts % ep, f"does not divide num_experts={config.num_experts}"),
                (zero.get("stage", 0) not in (1, 2) or offload,
                 f"works with ZeRO-1 or ZeRO-2 without offload (ds_configs/zero1.json, ds_configs/zero2.json); "
                 f"--deepspeed {path} has stage {zero.get('stage', 0)}{' with offload' if offload else ''}")]
    for failed, why in problems:
        if failed:
            raise ConfigError(f"{name} = {ep} {why} (or use --expert-parallel-size 1)")


def export_folder(recipe: Recipe) -> Path | None:
    """`--model` given as an HF export (config.json + model.safetensors), else None."""
    folder = Path(recipe.model)
    if recipe.model in PRESETS or (folder / ckpt.STATE_FILE).is_file():
        return None
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(f"--model {folder}: neither an HF export (config.json + model.safetensors) nor a "
                          "checkpoint; pass RUNDIR/final, a `python -m doge.export` folder or a checkpoint folder")
    return folder


def model_config(recipe: Recipe, source_state: ckpt.TrainerState | None) -> DogeConfig:
    """The checkpoint's model when there is one, else the --model export's or preset's config."""
    export = export_folder(recipe)
    try:
        config = (DogeConfig(**source_state.model_config) if source_state
                  else DogeConfig.from_pretrained(export) if export
                  else DogeConfig.from_preset(recipe.model, **recipe.model_overrides))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model_overrides {recipe.model_overrides}: {err}") from err
    return config


@dataclass
class Start:
    """Where a run's model comes from: a checkpoint to load (`source`), or fresh weights (a preset,
    an export, or a dense model to upcycle), and the model it trains."""

    source: Path | None  # checkpoint to load: own latest (resume) or --init-from
    source_state: ckpt.TrainerState | None
    resumed: bool
    config: DogeConfig
    init_weights: Path | None  # HF export or checkpoint whose weights the fresh model starts from
    upcycle_from: DogeConfig | None  # the dense model of init_weights, turned into config's CDMoE
    skipped: list[tuple[Path, str]]  # incomplete checkpoints, to move aside


def start_point(rundir: Path, recipe: Recipe, ds_path: str, ds_config: dict) -> Start:
    source, source_state, skipped = resolve_start(rundir, recipe)
    resumed = source is not None and source.parent == rundir / "checkpoints"
    if any(recipe.upcycle_to()) and not resumed:  # a resume holds the CDMoE model
        init_weights, dense, config = upcycle_start(recipe, source, source_state)
        start = Start(None, None, False, config, init_weights, dense, skipped)
    else:
        if source is not None:
            check_zero_stage(ds_path, ds_config, source)
        start = Start(source, source_state, resumed, model_config(recipe, source_state),
                      None if source else export_folder(recipe), None, skipped)
    # the recipe's router settings, whatever the start was trained with
    start.config.router_aux_loss_coef = recipe.aux_loss_weight
    if start.config.is_moe:
        start.config.router_z_loss_coef, start.config.router_fp32 = recipe.router_z_loss_weight, recipe.router_fp32
    return start


def upcycle_start(recipe: Recipe, source: Path | None, source_state: ckpt.TrainerState | None
                  ) -> tuple[Path, DogeConfig, DogeConfig]:
    """A new upcycled run: (dense weights folder, dense config, CDMoE config). The dense start is
    --init-from / a --model checkpoint (only its weights are used: the optimizer starts fresh for
    the new parameters) or a --model export."""
    from doge.model.upcycle import upcycled_config

    experts, top_k = recipe.upcycle_to()
    if (experts is None) != (top_k is None):
        raise ConfigError("--upcycle-experts and --upcycle-top-k go together: give both (e.g. 1024 and 16 for "
                          "doge-20m) or neither")
    folder = source or export_folder(recipe)
    if folder is None:
        raise ConfigError(f"--upcycle-experts needs a trained dense model to start from: --model {recipe.model} is "
                          "a preset; pass --model EXPORT (e.g. RUNDIR/final) or --init-from CHECKPOINT")
    dense = DogeConfig(**source_state.model_config) if source_state else DogeConfig.from_pretrained(folder)
    try:
        return folder, dense, upcycled_config(dense, experts, top_k)
    except ValueError as err:
        raise ConfigError(f"--upcycle-experts {experts} --upcycle-top-k {top_k} with {folder}: {err}") from err


def deepspeed_config(path: str, recipe: Recipe, global_batch: int, grad_accum: int, world: int,
                     bf16: bool) -> dict:
    try:
        config = fill_ds_config(path, recipe, recipe.micro_batch_size, grad_accum, world, bf16)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--deepspeed {path}: {err}") from err
    if config.get("fp16", {}).get("enabled"):
        raise ConfigError(f"--deepspeed {path}: fp16 is enabled; Doge trains in bf16 or fp32: set "
                          "\"fp16\": {\"enabled\": false} and choose --precision bf16")
    return config


def preflight(args: argparse.Namespace, recipe: Recipe, objective_cls: type[Objective], world: int) -> Plan:
    rundir = Path(args.output)
    main_rank = rank_from_env() == 0  # rank 0 holds the RUNDIR lock for the job
    if main_rank:
        runlock.check(rundir)
    objective_cls.resolve(args.data, recipe, rundir)
    epochs = recipe.length_in_epochs()
    if epochs is None and recipe.max_steps is None:
        raise ConfigError(f"--epochs none needs {flag('max_steps')}: give the run's length in optimizer steps, "
                          "or in passes over the data with --epochs N")
    schedule = schedule_of(recipe) if epochs is None else None  # else max_steps follows from the data
    global_batch, grad_accum = batch_geometry(recipe, world)
    downstream.check(recipe)
    bf16 = use_bf16(recipe.precision)
    ds_config = deepspeed_config(args.deepspeed, recipe, global_batch, grad_accum, world, bf16)
    start = start_point(rundir, recipe, args.deepspeed, ds_config)
    source, source_state, config = start.source, start.source_state, start.config
    check_resume(recipe, objective_cls, start)
    check_expert_parallel(recipe, args.deepspeed, ds_config, config, world)
    objective = objective_cls.open(args.data, recipe, config, source_state)
    check_same_data(args.data, objective, start)
    if epochs is not None:
        schedule = schedule_from_epochs(recipe, epochs, objective.samples_per_epoch(), global_batch)
    reshard = source is not None and (source_state.world_size, source_state.recipe.get(
        "expert_parallel_size", 1)) != (world, recipe.expert_parallel_size)
    if reshard:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    compiled = compile_wanted(recipe.compile, device_type())
    return Plan(recipe, rundir, world, start, objective, schedule, global_batch, grad_accum, ds_config, bf16,
                compiled, reshard, runlock.acquire(rundir) if main_rank else None)

