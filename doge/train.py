"""Pre-train a Doge model with DeepSpeed: `deepspeed [--num_gpus N] doge/train.py --deepspeed
ds_configs/zero2.json --recipe recipes/doge-160m.yaml --data DATADIR --output RUNDIR [--field value]...`

Also runs under `torchrun` and as `python doge/train.py` (one process); on CPU set DS_ACCELERATOR=cpu.
Starting on a RUNDIR that holds a complete checkpoint resumes from it, on any world size.
SIGUSR1/SIGTERM: finish the current step, save, exit 0 (`python -m doge.launch` in place of
`deepspeed` makes the launcher exit 0 too: DeepSpeed's own runner dies of SIGUSR1).

The loop is short on purpose: schedule, checkpointing, metrics and data order live in their own
modules; this file only wires them together.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed doge/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from doge import DogeConfig, DogeForCausalLM
from doge.data import DataError, open_pretrain_data
from doge.training import checkpoint as ckpt
from doge.training.ds_config import fill as fill_ds_config
from doge.training.metrics import Reporter, device_peak_flops, flops_per_token, start_wandb
from doge.training.recipe import Recipe, add_recipe_flags, load_recipe
from doge.training.schedule import WSD


class ConfigError(ValueError):
    """A run that cannot start; raised before the first step, message names the field and the fix."""


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_stop_requested = []
NAN_STEPS_ENV = "DOGE_FAULT_NAN_STEPS"  # fault injection for tests: "5,6" makes those steps' loss NaN


def parse_args(argv=None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config, e.g. ds_configs/zero2.json")
    parser.add_argument("--recipe", metavar="YAML", help="recipe file, e.g. recipes/doge-20m.yaml")
    parser.add_argument("--data", required=True, metavar="PATH", help="prepared DATADIR or mixture YAML")
    parser.add_argument("--output", required=True, metavar="RUNDIR", help="run folder: checkpoints, metrics, final export")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    add_recipe_flags(parser)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Recipe.__dataclass_fields__}
    try:
        return args, load_recipe(args.recipe, overrides)
    except (OSError, ValueError, TypeError) as err:
        parser.error(str(err))


def init_distributed() -> tuple[int, int, int]:
    """(rank, world, local world); a plain `python doge/train.py` becomes a 1-rank job."""
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, default)
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:  # the launcher may not split the cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    return dist.get_rank(), dist.get_world_size(), local_world


def batch_geometry(recipe: Recipe, world: int, data) -> tuple[int, int]:
    """(global batch in samples, gradient accumulation steps), or a ConfigError naming the fix."""
    if recipe.seq_len > data.seq_len:
        raise ConfigError(f"--seq-len {recipe.seq_len} exceeds the data's seq_len {data.seq_len}: lower --seq-len "
                          f"or prepare the data with --seq-len {recipe.seq_len}")
    if recipe.global_batch_tokens % recipe.seq_len:
        raise ConfigError(f"--global-batch-tokens {recipe.global_batch_tokens} is not a multiple of --seq-len "
                          f"{recipe.seq_len}")
    global_batch = recipe.global_batch_tokens // recipe.seq_len
    if global_batch % (recipe.micro_batch_size * world):
        raise ConfigError(f"global batch of {global_batch} samples is not divisible by --micro-batch-size "
                          f"{recipe.micro_batch_size} x world size {world}; choose --global-batch-tokens as a "
                          f"multiple of {recipe.seq_len * recipe.micro_batch_size * world}")
    return global_batch, global_batch // (recipe.micro_batch_size * world)


def open_data(path: str, recipe: Recipe, vocab_size: int, split: str):
    try:
        data = open_pretrain_data(path, seed=recipe.seed, split=split)
    except (DataError, OSError) as err:
        raise ConfigError(f"--data {path}: {err}") from err
    if data.vocab_size > vocab_size:
        raise ConfigError(f"--data {path}: tokenizer has {data.vocab_size} tokens but the model's vocab_size is "
                          f"{vocab_size}: set model_overrides: {{vocab_size: {data.vocab_size}}} in the recipe or "
                          "prepare the data with a smaller tokenizer")
    return data


def resolve_start(rundir: Path, recipe: Recipe) -> tuple[Path | None, ckpt.TrainerState | None]:
    """The checkpoint to load (own `latest`, else --init-from) and its trainer state."""
    own = ckpt.find_latest(rundir / "checkpoints")
    if own is not None:
        if recipe.resume == "never":
            raise ConfigError(f"--output {rundir} already holds checkpoint {own.name} and --resume is never: "
                              "choose a new --output or drop --resume never")
        return own, ckpt.TrainerState.read(own)
    if recipe.init_from:
        source = Path(recipe.init_from)
        if not (source / ckpt.STATE_FILE).is_file():
            raise ConfigError(f"--init-from {source}: not a complete checkpoint (no {ckpt.STATE_FILE}); "
                              "pass a RUNDIR/checkpoints/step-XXXXXXXX folder")
        return source, ckpt.TrainerState.read(source)
    return None, None


def check_compatible(recipe: Recipe, data, resumed: bool, source_state: ckpt.TrainerState | None, args) -> None:
    if source_state is None:
        return
    if resumed and source_state.data_fingerprint != data.fingerprint:
        raise ConfigError(f"--data {args.data} is not the data this run was trained on (fingerprint "
                          f"{data.fingerprint} != {source_state.data_fingerprint}): pass the original --data, "
                          "or start a new --output with --init-from to continue on new data")
    if source_state.tokenizer_fingerprint != data.tokenizer_fingerprint:
        raise ConfigError(f"--data {args.data} uses tokenizer {data.tokenizer_fingerprint} but the checkpoint "
                          f"was trained with {source_state.tokenizer_fingerprint}: prepare the data with the "
                          "checkpoint's tokenizer (its tokenizer/ folder)")


def build_engine(args, recipe: Recipe, config: DogeConfig, micro: int, grad_accum: int, world: int,
                 universal: bool):
    torch.manual_seed(recipe.seed)
    model = DogeForCausalLM(config)
    accel = get_accelerator()
    bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and accel.device_name() != "cpu"
                                          and accel.is_bf16_supported())
    if recipe.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"--precision {recipe.precision!r}: choose auto, bf16 or fp32")
    ds_config = fill_ds_config(args.deepspeed, recipe, micro, grad_accum, world, bf16)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return engine, bf16


def load_start(engine, source: Path, state: ckpt.TrainerState, rundir: Path, world: int, rank: int,
               resumed: bool) -> None:
    """Load engine state from `source`, through a universal copy when the world size changed."""
    load_dir = source
    if state.world_size != world:
        out_root = rundir / "checkpoints" / "universal" if resumed else rundir / "init-universal"
        if rank == 0:
            ckpt.to_universal(source, out_root)
        dist.barrier()
        load_dir = out_root / source.name
    path, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {load_dir}")
    if resumed and state.world_size == world:
        ckpt.restore_rng(source, rank)


def train_step(engine, data, state: ckpt.TrainerState, global_batch: int, recipe: Recipe, rank: int, world: int):
    """One optimizer step over the next `global_batch` samples; returns (global mean loss, grad norm)."""
    batch = data.rank_batch(state.samples_consumed, global_batch, rank, world)[:, :recipe.seq_len]
    batch = batch.to(engine.device)
    losses = []
    poison = str(state.step + 1) in os.environ.get(NAN_STEPS_ENV, "").split(",")
    for micro in batch.split(recipe.micro_batch_size):
        loss = engine(input_ids=micro, labels=micro, skip_logits=True).loss
        if poison:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()  # DeepSpeed applies the update at the accumulation boundary only
        losses.append(loss.detach().float())
    mean = torch.stack(losses).mean().reshape(1)
    stop = torch.tensor([float(bool(_stop_requested))], device=mean.device)
    reduced = torch.cat([mean / world, stop])
    dist.all_reduce(reduced)
    norm = engine.get_global_grad_norm()
    return reduced[0].item(), float("nan") if norm is None else float(norm), reduced[1].item() > 0


@torch.no_grad()
def evaluate(engine, val, n_samples: int, micro: int, seq_len: int, rank: int, world: int) -> float:
    """Mean loss over the first `n_samples` held-out samples, sharded evenly over ranks."""
    engine.eval()
    per_rank = n_samples // world
    total = torch.zeros(1, device=engine.device)  # nccl reduces device tensors only
    for start in range(rank * per_rank, (rank + 1) * per_rank, micro):
        ids = torch.stack([torch.as_tensor(val[i][:seq_len]) for i in range(start, start + micro)]).to(engine.device)
        total += engine(input_ids=ids, labels=ids, skip_logits=True).loss.float() * micro
    engine.train()
    dist.all_reduce(total)
    return total.item() / (per_rank * world)


@dataclass
class Run:
    """Everything the training loop touches, built once by `setup`."""
    recipe: Recipe
    rundir: Path
    engine: object
    state: ckpt.TrainerState
    data: object
    val: object
    n_val: int
    schedule: WSD
    global_batch: int
    rank: int
    world: int
    reporter: Reporter | None


def setup(args, recipe: Recipe, rank: int, world: int, local_world: int) -> Run:
    """Resolve the start point, check the config against the data, build the engine, load state."""
    rundir = Path(args.output)
    if rank == 0:
        rundir.mkdir(parents=True, exist_ok=True)
        ckpt.prune(rundir / "checkpoints", keep_last=0)  # only removes leftovers of killed saves
    dist.barrier()

    source, source_state = resolve_start(rundir, recipe)
    resumed = source is not None and source.parent == rundir / "checkpoints"
    config = (DogeConfig(**source_state.model_config) if source_state
              else DogeConfig.from_preset(recipe.model, **recipe.model_overrides))
    data = open_data(args.data, recipe, config.vocab_size, "train")
    check_compatible(recipe, data, resumed, source_state, args)
    global_batch, grad_accum = batch_geometry(recipe, world, data)
    schedule = WSD(recipe.lr, recipe.warmup_steps, recipe.decay_steps, recipe.max_steps, recipe.decay_shape,
                   recipe.min_lr_ratio, recipe.decay_start)
    val = open_data(args.data, recipe, config.vocab_size, "val") if recipe.eval_interval else None
    per_round = world * recipe.micro_batch_size
    n_val = min(recipe.eval_samples, len(val)) // per_round * per_round if val else 0

    universal = source is not None and source_state.world_size != world
    engine, bf16 = build_engine(args, recipe, config, recipe.micro_batch_size, grad_accum, world, universal)
    state = ckpt.TrainerState(world_size=world, recipe=asdict(recipe), model_config=config.to_dict(),
                              data_fingerprint=data.fingerprint, tokenizer_fingerprint=data.tokenizer_fingerprint)
    if source is not None:
        load_start(engine, source, source_state, rundir, world, rank, resumed)
        if resumed:
            state = ckpt.TrainerState(**{**asdict(source_state), "world_size": world, "recipe": asdict(recipe)})
    run = Run(recipe, rundir, engine, state, data, val, n_val, schedule, global_batch, rank, world, None)
    if rank == 0:
        run.reporter = start_reporter(run, config, bf16, local_world, grad_accum,
                                      f"resumed from {source}" if resumed else
                                      f"initialised from {source}" if source else "fresh start")
    return run


def start_reporter(run: Run, config: DogeConfig, bf16: bool, local_world: int, grad_accum: int,
                   origin: str) -> Reporter:
    """Rank 0's console/metrics/W&B reporter, and the run's opening lines."""
    recipe, state = run.recipe, run.state
    wandb_run = start_wandb(recipe.wandb, recipe.wandb_project, run.rundir, state.wandb_run_id, asdict(recipe))
    state.wandb_run_id = wandb_run.id if wandb_run is not None else None
    n_params = sum(p.numel() for p in run.engine.module.parameters())
    reporter = Reporter(run.rundir, recipe.max_steps, state.step,
                        flops_per_token(n_params, config.num_hidden_layers, config.hidden_size, recipe.seq_len),
                        device_peak_flops(bf16, local_world) * run.world, wandb_run)
    reporter.message(f"{origin} at step {state.step}: {n_params / 1e6:.2f}M params, world {run.world}, global "
                     f"batch {run.global_batch} x {recipe.seq_len} tokens, grad accum {grad_accum}, "
                     f"{'bf16' if bf16 else 'fp32'}")
    if run.val is not None and not run.n_val:
        reporter.message(f"validation off: the val split has {len(run.val)} samples, fewer than micro batch x world "
                         f"= {run.world * recipe.micro_batch_size}; prepare more with --val-fraction/--val-rows")
    return reporter


def guard(run: Run, loss: float, grad_norm: float) -> bool:
    """Count a non-finite step (DeepSpeed skipped its update); stop after --max-bad-steps in a row."""
    state, recipe = run.state, run.recipe
    if math.isfinite(loss) and math.isfinite(grad_norm):
        state.bad_steps_in_row = 0
        return True
    state.bad_steps_in_row += 1
    state.skipped_steps += 1
    if run.reporter:
        run.reporter.message(f"step {state.step}: non-finite loss {loss} / grad norm {grad_norm}, update skipped "
                             f"({state.bad_steps_in_row} in a row)")
    if state.bad_steps_in_row >= recipe.max_bad_steps:
        raise RuntimeError(f"{state.bad_steps_in_row} non-finite steps in a row (--max-bad-steps "
                           f"{recipe.max_bad_steps}): lower --lr, raise --warmup-steps, or check the data; "
                           f"the last good checkpoint is in {run.rundir / 'checkpoints'}")
    return False


def train_loop(run: Run) -> bool:
    """Steps until max_steps or a stop signal (returns True if stopped), logging, evaluating, saving."""
    recipe, state, reporter = run.recipe, run.state, run.reporter
    losses, tokens_since, stopped = [], 0, False
    while state.step < recipe.max_steps and not stopped:
        lr = run.schedule(state.step)
        for group in run.engine.optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm, stopped = train_step(run.engine, run.data, state, run.global_batch, recipe, run.rank,
                                              run.world)
        state.step += 1
        state.samples_consumed += run.global_batch
        state.tokens_seen += run.global_batch * recipe.seq_len
        tokens_since += run.global_batch * recipe.seq_len
        if guard(run, loss, grad_norm):
            losses.append(loss)
        last = state.step == recipe.max_steps
        if reporter:
            reporter.advance(state.step)
            if state.step % recipe.log_interval == 0 or last:
                reporter.train(state.step, sum(losses) / len(losses) if losses else math.nan, lr, grad_norm,
                               tokens_since, state.tokens_seen, state.samples_consumed, state.skipped_steps)
                losses, tokens_since = [], 0
        if run.n_val and (state.step % recipe.eval_interval == 0 or last):
            val_loss = evaluate(run.engine, run.val, run.n_val, recipe.micro_batch_size, recipe.seq_len, run.rank,
                                run.world)
            if reporter:
                reporter.validation(state.step, val_loss)
        if stopped or last or (recipe.save_interval and state.step % recipe.save_interval == 0):
            ckpt.save(run.engine, run.rundir / "checkpoints", state, run.data.tokenizer_dir, recipe.keep_last)
            if reporter:
                reporter.message(f"saved checkpoint {ckpt.step_tag(state.step)}" + (" (stop signal)" if stopped else ""))
    return stopped


def main(argv=None) -> int:
    args, recipe = parse_args(argv)
    rank, world, local_world = init_distributed()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _stop_requested.append(signum))
    run = setup(args, recipe, rank, world, local_world)
    stopped = train_loop(run)
    if rank == 0:
        run.reporter.close()
        if not stopped:
            finish(run.rundir, recipe)
    run.engine.destroy()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def finish(rundir: Path, recipe: Recipe) -> None:
    """Rank 0 at the end of a completed run: plot, and HF export of the final checkpoint."""
    from doge.export import export
    from doge.plot import plot

    plot(rundir)
    if recipe.export:
        export(ckpt.find_latest(rundir / "checkpoints"), rundir / "final", replace=True)
        print(f"exported {rundir / 'final'}", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
