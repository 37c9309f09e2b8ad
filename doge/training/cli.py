"""The command line every training entry point shares: parse, check, start, train, finish.

`main(Objective, __doc__)` is a whole entry script: flags are `--deepspeed`, `--recipe`,
`--data`, `--output` and one flag per field of the objective's recipe (`Objective.recipe_class`),
so each entry script lists its own fields and defaults and refuses another objective's. The
order matters: the run is checked completely (`doge.training.preflight`) before the process
group starts, so a bad config (or a flag argparse refuses) costs no DeepSpeed start-up and prints
one `error: ...` line (exit 2) from rank 0 only; under `python -m doge.launch` it is the last line.

Rank 0 keeps `RUNDIR/status.json` ({"state": running|finished|stopped|failed, "reason", "step"})
up to date at start, finish, stop signal and failure, for requeue scripts; a job killed outright
(kill -9, a lost node) leaves "running" behind with a stale `run.lock`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from doge import atomic
from doge.data import DataError
from doge.training import checkpoint as ckpt
from doge.training import runlock
from doge.training.distributed import Dist, barrier, init_distributed, rank_from_env, shutdown, world_from_env
from doge.training.engine import build_engine, load_start
from doge.training.flops import device_peak_flops, flops_per_token
from doge.training.launcher_watch import record_error, watch_launcher
from doge.training.loop import Trainer, install_stop_handlers, trainer_state
from doge.training.metrics import Reporter, Throughput, start_wandb
from doge.training.objective import Objective
from doge.training.preflight import Plan, preflight
from doge.training.recipe import ConfigError, Recipe


class FlagParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value of the wrong type) end like every other
    refusal: one `error: ...` line from rank 0 (`fail`) and exit 2, instead of usage plus a message
    from each rank."""

    def error(self, message: str):
        message = message.replace("invalid <lambda> value", "invalid value")
        sys.exit(fail(ConfigError(f"{message}; see {self.prog} --help")))


def parse_args(recipe_class: type[Recipe], description: str, argv=None) -> tuple[argparse.Namespace, Recipe]:
    parser = FlagParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", required=True, metavar="JSON",
                        help="DeepSpeed config, e.g. ds_configs/zero2.json")
    parser.add_argument("--recipe", metavar="YAML", help="recipe file, e.g. recipes/doge-20m.yaml")
    parser.add_argument("--data", required=True, metavar="PATH", help="prepared DATADIR or mixture YAML")
    parser.add_argument("--output", required=True, metavar="RUNDIR",
                        help="run folder: checkpoints, metrics, final export")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    recipe_class.add_flags(parser)
    args = parser.parse_args(argv)
    names = {f.name for f, _ in recipe_class.fields()}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return args, recipe_class.load(args.recipe, overrides)


def start(plan: Plan, dist: Dist) -> Trainer:
    """Engine, loaded state and rank 0's reporter: the trainer, ready for its first step."""
    if dist.is_main:
        plan.rundir.mkdir(parents=True, exist_ok=True)
        ckpt.prune(plan.rundir / "checkpoints", keep_last=0)  # only removes leftovers of killed saves
        notes = [plan.lock_note] if plan.lock_note else []
        notes += [f"skipped checkpoint {folder.name}: {why}; moved to {ckpt.move_aside(folder)}"
                  for folder, why in plan.start.skipped]
        for note in notes:
            print(note, flush=True)
    barrier()
    engine = build_engine(plan.start.config, plan.ds_config, plan.recipe.weight_decay, plan.recipe.seed,
                          plan.start.init_weights, plan.recipe.expert_parallel_size, plan.start.upcycle_from,
                          compiled=plan.compiled, dynamic_length=plan.objective.variable_length,
                          checkpointing=plan.recipe.activation_checkpointing,
                          expert_lr_scale=plan.recipe.expert_lr_scale if plan.start.config.is_moe else 1.0)
    if plan.start.source is not None:
        loaded = load_start(engine, plan, dist)
        plan.start.source, plan.start.source_state = loaded, ckpt.TrainerState.read(loaded)
    trainer = Trainer(plan, dist, engine, trainer_state(plan, dist.world), None, None)
    if dist.is_main:
        open_reporting(trainer)
    return trainer


def open_reporting(trainer: Trainer) -> None:
    """Rank 0's W&B run, reporter and throughput meter, and the run's opening lines."""
    plan, state, dist = trainer.plan, trainer.state, trainer.dist
    recipe = plan.recipe
    wandb_run = start_wandb(recipe.wandb, recipe.wandb_project, plan.rundir, state.wandb_run_id, asdict(recipe))
    state.wandb_run_id = wandb_run.id if wandb_run is not None else None
    trainer.reporter = Reporter(plan.rundir, recipe.max_steps, state.step, wandb_run)
    trainer.throughput = Throughput(state.step, recipe.max_steps, flops_per_token(plan.start.config, recipe.seq_len),
                                    device_peak_flops(plan.bf16, dist.local_world) * dist.world)
    begin = plan.start
    origin = (f"resumed from {begin.source}" if begin.resumed else
              f"initialised from {begin.source or begin.init_weights}" if begin.source or begin.init_weights
              else "fresh start") + (f", upcycled to {begin.config.num_experts} experts top-"
                                     f"{begin.config.num_experts_per_tok}" if begin.upcycle_from else "")
    n_params = sum(p.numel() for p in trainer.engine.module.parameters())
    trainer.message(f"{origin} at step {state.step}: {n_params / 1e6:.2f}M params, world {dist.world}, global "
                    f"batch {plan.global_batch} x {recipe.seq_len} tokens, grad accum {plan.grad_accum}, "
                    f"{'bf16' if plan.bf16 else 'fp32'}, {'compiled' if plan.compiled else 'eager'}"
                    f"{', activation checkpointing' if recipe.activation_checkpointing else ''}; "
                    f"{plan.objective.describe()}")
    if recipe.eval_interval and not plan.objective.eval_batches(dist, recipe.micro_batch_size, recipe.eval_samples):
        trainer.message(f"validation off: the held-out split has fewer samples than micro batch x world = "
                        f"{dist.world * recipe.micro_batch_size}; prepare more with --val-fraction/--val-rows "
                        "of data_tools/prepare.py (data_tools/prepare_chat.py for chat data)")


def finish(trainer: Trainer) -> None:
    """Rank 0 at the end of a completed run: plot, and HF export of the final checkpoint (both
    imported here, so no rank loads matplotlib at start-up)."""
    from doge.training.export import export
    from doge.training.plot import plot

    rundir = trainer.plan.rundir
    plot(rundir)
    if trainer.recipe.export:
        export(ckpt.find_latest(rundir / "checkpoints"), rundir / "final", replace=True)
        trainer.message(f"exported {rundir / 'final'}")


def fail(err: Exception) -> int:
    """One line on rank 0 (every rank fails the same check), exit code 2. Under `python -m doge.launch`
    the launcher prints it (`record_error`), after DeepSpeed's own lines, so the error comes last."""
    if rank_from_env() == 0:
        line = f"error: {err}".replace("\n", " ")
        if not record_error(line):
            print(line, file=sys.stderr, flush=True)
    return 2


STATUS_FILE = "status.json"


def write_status(rundir: Path, state: str, reason: str, step: int | None) -> None:
    """Rank 0: RUNDIR/status.json, replaced atomically (a reader never sees half of it)."""
    if rank_from_env() == 0:
        atomic.write_json(Path(rundir) / STATUS_FILE, {"state": state, "reason": reason, "step": step})


def refuse(err: ConfigError, output: str | None) -> int:
    """A run that cannot start: `failed` in status.json when it continues a stopped or failed run
    (a finished run stays finished, a running job's status is not ours), then the one line."""
    path = Path(output or "") / STATUS_FILE
    old = json.loads(path.read_text()) if output and path.is_file() else {}
    if old.get("state") in ("stopped", "failed"):
        write_status(Path(output), "failed", str(err), old.get("step"))
    return fail(err)


def main(objective_cls: type[Objective], description: str, argv=None) -> int:
    watch_launcher()  # a rank never outlives its launcher
    args = None
    try:
        args, recipe = parse_args(objective_cls.recipe_class, description, argv)
        plan = preflight(args, recipe, objective_cls, world_from_env())
    except ConfigError as err:
        return refuse(err, args and args.output)
    try:
        return train(plan)
    finally:
        runlock.release(plan.rundir)


def train(plan: Plan) -> int:
    """Start, fit and finish a checked run, with its status.json at each stage."""
    dist, trainer = init_distributed(), None
    install_stop_handlers()
    try:
        trainer = start(plan, dist)
        write_status(plan.rundir, "running", "", trainer.state.step)
        stopped = trainer.fit()
        if dist.is_main:
            trainer.reporter.close()
            if not stopped:
                finish(trainer)
    except (DataError, ConfigError) as err:  # e.g. a shard whose bytes no longer match its manifest
        write_status(plan.rundir, "failed", str(err), trainer and trainer.state.step)
        return fail(err)
    except BaseException as err:  # a crash: recorded, then the traceback as usual
        write_status(plan.rundir, "failed", f"{type(err).__name__}: {err}", trainer and trainer.state.step)
        raise
    write_status(plan.rundir, "stopped" if stopped else "finished", "stop signal" if stopped else "done",
                 trainer.state.step)
    trainer.engine.destroy()
    shutdown()
    return 0
