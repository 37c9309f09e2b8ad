"""The training loop, the same for every objective.

Per optimizer step: set the LR from the schedule, run the objective's micro-batches through the
engine (DeepSpeed accumulates and steps at the boundary), agree over ranks on the stop flag, then
log, evaluate and checkpoint on their intervals. A stop signal (SIGUSR1/SIGTERM) on any rank ends
the step, saves and returns.

The step never waits for the device: its metrics (and the gradient norm) stay device tensors
until a step that logs, evaluates, saves or stops. There the pending steps' metrics are reduced
over ranks in one collective and read back at once, and each pending step is then guarded
against non-finite values and logged in order, as if it had been read when it ran. The stop flag
is a host value exchanged on the host. Non-finite steps are skipped by the optimizer itself
(DeepSpeed's check, or on the device: `doge.training.engine.guard_on_device`).
"""
from __future__ import annotations

import math
import signal
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch
from deepspeed import DeepSpeedEngine

from doge.training import checkpoint as ckpt
from doge.training import faults
from doge.training.distributed import Dist, all_reduce_sum, any_rank
from doge.training.engine import set_lr
from doge.training.expert_parallel import expert_group
from doge.training.metrics import Reporter, Throughput
from doge.training.objective import TrainedModel
from doge.training.preflight import Plan

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_stop_requested: list[int] = []


def install_stop_handlers() -> None:
    """SIGUSR1/SIGTERM only set a flag: the step finishes, then every rank saves and stops."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: _stop_requested.append(signum))


def accumulate(sums: dict, metrics: dict) -> dict:
    """sums[k] += metrics[k] for every key (missing keys start at 0)."""
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + value
    return sums


@dataclass
class Interval:
    """Means of the good steps' metrics since the last log line (NaN, logged as null, if none was)."""

    sums: dict = field(default_factory=dict)
    good_steps: int = 0

    def add(self, metrics: dict, good: bool) -> None:
        """A bad step's values (non-finite) are left out; its keys still appear in the next line."""
        accumulate(self.sums, metrics if good else dict.fromkeys(metrics, 0.0))
        self.good_steps += good

    def means(self) -> dict:
        out = {k: v / self.good_steps if self.good_steps else math.nan for k, v in self.sums.items()}
        self.sums, self.good_steps = {}, 0
        return out


@dataclass
class Trainer:
    plan: Plan
    dist: Dist
    engine: DeepSpeedEngine
    state: ckpt.TrainerState
    reporter: Reporter | None  # rank 0 only
    throughput: Throughput | None

    @property
    def recipe(self):
        return self.plan.recipe

    @cached_property
    def model(self) -> TrainedModel:
        """What the objective's loss is handed: the engine's forward, the model's config and the
        expert group (the engine itself stays the loop's)."""
        return TrainedModel(self.engine, self.engine.module.config, expert_group(self.recipe.expert_parallel_size))

    def reduce(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Rank means of scalar `values`, read back."""
        return dict(zip(values, self.rank_means([values])[0].tolist()))

    def rank_means(self, rows: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """(steps, metrics) rank means of several steps' scalar metrics (same keys), in one collective."""
        device = self.engine.device  # nccl reduces device tensors only
        table = torch.stack([torch.stack([v.float().reshape(()).to(device) for v in row.values()]) for row in rows])
        return all_reduce_sum(table / self.dist.world)

    def to_device(self, batch: dict) -> dict:
        """Pinned host memory and a non-blocking copy on GPUs: the host goes on preparing the next batch."""
        device = self.engine.device
        if torch.device(device).type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step; returns this rank's metrics (means over its micro-batches) and the global
        gradient norm, as device tensors: nothing is read back here."""
        objective, step, consumed = self.plan.objective, self.state.step + 1, self.state.samples_consumed
        batches = objective.train_batches(consumed, self.plan.global_batch, self.dist, self.recipe.micro_batch_size)
        faults.trace(step, self.dist.rank, consumed + self.dist.rank * self.plan.global_batch // self.dist.world,
                     batches)
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            loss, metrics = faults.poison(step, *objective.loss(self.model, self.to_device(batch)))
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the update at the accumulation boundary only
            accumulate(sums, {"objective": loss.detach(), **metrics})
            faults.pause(step, "step")  # after the first micro-batch: mid-accumulation
        norm = self.engine.get_global_grad_norm()  # a device tensor, or a float / None
        norm = torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32, device=self.engine.device)
        return {**{k: v / len(batches) for k, v in sums.items()},
                "grad_norm": torch.where(norm < 0, math.inf, norm)}  # DeepSpeed's -1: a non-finite norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the objective's held-out batches, as `val_<name>`."""
        batches = self.plan.objective.eval_batches(self.dist, self.recipe.micro_batch_size, self.recipe.eval_samples)
        if not batches:
            return {}
        self.engine.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            accumulate(sums, self.plan.objective.loss(self.model, self.to_device(batch))[1])
            faults.pause(self.state.step, "eval")
        self.engine.train()
        means = self.reduce({k: v / len(batches) for k, v in sums.items()})
        return {f"val_{k}": v for k, v in means.items()}

    def guard(self, step: int, loss: float, grad_norm: float) -> bool:
        """Count a non-finite step (its update was skipped); stop after --max-bad-steps in a row."""
        state, recipe = self.state, self.recipe
        if math.isfinite(loss) and math.isfinite(grad_norm):
            state.bad_steps_in_row = 0
            return True
        state.bad_steps_in_row += 1
        state.skipped_steps += 1
        self.message(f"step {step}: non-finite loss {loss} / grad norm {grad_norm}, update skipped "
                     f"({state.bad_steps_in_row} in a row)")
        if state.bad_steps_in_row >= recipe.max_bad_steps:
            raise RuntimeError(f"{state.bad_steps_in_row} non-finite steps in a row (--max-bad-steps "
                               f"{recipe.max_bad_steps}): lower --lr, raise --warmup-steps, or check the data; "
                               f"the last good checkpoint is in {self.plan.rundir / 'checkpoints'}")
        return False

    def message(self, text: str) -> None:
        if self.reporter:
            self.reporter.message(text)

    def log(self, interval: Interval, lr: float, grad_norm: float) -> None:
        if not self.reporter:
            return
        metrics = interval.means()
        metrics.pop("objective")
        state = self.state
        self.reporter.log(state.step, {**metrics, "lr": lr, "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                                       "samples_consumed": state.samples_consumed,
                                       **self.throughput.read(state.step), "skipped_steps": state.skipped_steps})

    def save(self, stopped: bool) -> None:
        ckpt.save(self.engine, self.plan.rundir / "checkpoints", self.state, self.plan.objective.tokenizer_dir,
                  self.recipe.keep_last)
        self.message(f"saved checkpoint {ckpt.step_tag(self.state.step)}" + (" (stop signal)" if stopped else ""))

    def fit(self) -> bool:
        """Steps until max_steps or a stop signal (returns True if stopped), logging, evaluating, saving."""
        recipe, state, plan = self.recipe, self.state, self.plan
        tokens_per_step = plan.global_batch * recipe.seq_len
        interval, pending, stopped = Interval(), [], False
        while state.step < recipe.max_steps and not stopped:
            faults.pace(state.step + 1)
            lr = plan.schedule(state.step)
            set_lr(self.engine, lr)
            with faults.sync_probe(state.step + 1, plan.rundir, self.dist.rank):
                pending.append((state.step + 1, lr, self.train_step()))
                stopped = any_rank(bool(_stop_requested))
            state.step += 1
            state.samples_consumed += plan.global_batch
            state.tokens_seen += tokens_per_step
            last = state.step == recipe.max_steps
            if self.reporter:
                self.reporter.advance(state.step)
                self.throughput.add(tokens_per_step)
            evaluate = recipe.eval_interval and (state.step % recipe.eval_interval == 0 or last)
            save = stopped or last or (recipe.save_interval and state.step % recipe.save_interval == 0)
            if evaluate or save or state.step % recipe.log_interval == 0:
                self.settle(pending, interval)
                pending = []
            if evaluate:
                self.validate()
            if save:
                self.save(stopped)
            faults.after_step(state.step)
        return stopped

    def settle(self, pending: list, interval: Interval) -> None:
        """Read the pending steps' metrics back at once, then guard and log each step in order."""
        keys = [k for k in pending[0][2] if k != "grad_norm"]
        means = self.rank_means([{k: metrics[k] for k in keys} for _, _, metrics in pending])
        norms = torch.stack([metrics["grad_norm"] for _, _, metrics in pending])  # global already
        for (step, lr, _), row in zip(pending, torch.cat((means, norms[:, None]), dim=1).tolist()):
            values, grad_norm = dict(zip(keys, row[:-1])), row[-1]
            interval.add(values, self.guard(step, values["objective"], grad_norm))
            if step % self.recipe.log_interval == 0 or step == self.recipe.max_steps:
                self.log(interval, lr, grad_norm)

    def validate(self) -> None:
        metrics = self.evaluate()
        if self.reporter and metrics:
            self.reporter.log(self.state.step, metrics)


def trainer_state(plan: Plan, world: int) -> ckpt.TrainerState:
    """The state to continue from: the resumed run's own, or a fresh one (also after --init-from)."""
    fresh = ckpt.TrainerState(world_size=world, recipe=asdict(plan.recipe), model_config=plan.start.config.to_dict(),
                              data_fingerprint=plan.objective.fingerprint,
                              tokenizer_fingerprint=plan.objective.tokenizer_fingerprint)
    if not plan.start.resumed:
        return fresh
    return ckpt.TrainerState(**{**asdict(plan.start.source_state), "world_size": world, "recipe": asdict(plan.recipe),
                                "model_config": fresh.model_config})
