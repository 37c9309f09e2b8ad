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
(DeepSpeed's check, or on the device: `doge.training.engine.guard_on_device`), and so are loss
spikes when `--spike-sigma` is set: `doge.training.spike_guard` judges the step on the device and
turns a spike into a non-finite step before its last backward.
"""
from __future__ import annotations

import math
import signal
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch
from deepspeed import DeepSpeedEngine

from doge.training import checkpoint as ckpt
from doge.training import downstream, faults
from doge.training.distributed import Dist, all_reduce_sum, any_rank
from doge.training.engine import set_lr
from doge.training.expert_parallel import expert_group
from doge.training.metrics import Reporter, Throughput
from doge.training.objective import TrainedModel
from doge.training.preflight import Plan
from doge.training.spike_guard import SpikeGuard, skip_line, stop_line

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
GLOBAL_METRICS = ("grad_norm", "spike")  # the same on every rank already: not averaged over ranks
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

    @cached_property
    def spikes(self) -> SpikeGuard | None:
        """The loss-spike guard (--spike-sigma), its window resumed from the trainer state; None when off."""
        recipe = self.recipe
        if not recipe.spike_sigma:
            return None
        return SpikeGuard(recipe.spike_sigma, recipe.spike_window, self.state.recent_losses, self.engine.device)

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
        """One optimizer step; returns this rank's metrics (means over its micro-batches), the global
        gradient norm and, with the spike guard on, its check of the step (`spike`), as device
        tensors: nothing is read back here."""
        objective, step, consumed = self.plan.objective, self.state.step + 1, self.state.samples_consumed
        batches = objective.train_batches(consumed, self.plan.global_batch, self.dist, self.recipe.micro_batch_size)
        faults.trace(step, self.dist.rank, consumed + self.dist.rank * self.plan.global_batch // self.dist.world,
                     batches)
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches, 1):
            loss, metrics = faults.spike(step, *faults.poison(step, *objective.loss(self.model, self.to_device(batch))))
            accumulate(sums, {"objective": loss.detach(), **metrics})
            if self.spikes and i == len(batches):  # the step's loss is known: a spike back-propagates NaN
                factor, check = self.spikes.judge(self.step_loss(sums["objective"], len(batches)))
                loss = loss * factor.to(loss.dtype)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the update at the accumulation boundary only
            faults.pause(step, "step")  # after the first micro-batch: mid-accumulation
        out = {**{k: v / len(batches) for k, v in sums.items()}, "grad_norm": self.grad_norm()}
        if self.spikes:
            self.spikes.push(check, out["grad_norm"])
            out["spike"] = check
        return out

    def step_loss(self, loss_sum: torch.Tensor, micro_batches: int) -> torch.Tensor:
        """The mean loss over this step's micro-batches and all ranks, on the device (shape (1,))."""
        return all_reduce_sum((loss_sum.float() / micro_batches).reshape(1)) / self.dist.world

    def grad_norm(self) -> torch.Tensor:
        """The step's global gradient norm as a device tensor; inf where DeepSpeed marks it invalid (-1)."""
        norm = self.engine.get_global_grad_norm()  # a device tensor, or a float / None
        norm = torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32, device=self.engine.device)
        return torch.where(norm < 0, math.inf, norm)

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

    def guard(self, step: int, loss: float, grad_norm: float, spike: list[float]) -> bool:
        """Whether the step's update was applied. A loss spike (`spike`: the guard's check, empty
        when it is off) and a non-finite step were skipped; each is counted apart, and stops the
        run after its own limit in a row. An applied step ends both streaks."""
        state, recipe = self.state, self.recipe
        if spike and spike[0]:
            return self.skip_spike(step, *spike[1:])
        if math.isfinite(loss) and math.isfinite(grad_norm):
            state.bad_steps_in_row = state.spikes_in_row = 0
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

    def skip_spike(self, step: int, loss: float, mean: float, std: float) -> bool:
        """Count a loss spike (its update was skipped); stop after --spike-max-skips in a row."""
        state, recipe = self.state, self.recipe
        state.spikes_in_row += 1
        state.skipped_spikes += 1
        self.message(skip_line(step, loss, mean, std, recipe.spike_sigma, state.spikes_in_row))
        if state.spikes_in_row >= recipe.spike_max_skips:
            latest = ckpt.find_latest(self.plan.rundir / "checkpoints")
            raise RuntimeError(stop_line(recipe, state.spikes_in_row, latest))
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
                                       **self.throughput.read(state.step), "skipped_steps": state.skipped_steps,
                                       **({"skipped_spikes": state.skipped_spikes} if self.spikes else {})})

    def save(self, stopped: bool) -> None:
        self.state.recent_losses = self.spikes.recent() if self.spikes else []
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
            benchmark = recipe.downstream_interval and not stopped and (
                state.step % recipe.downstream_interval == 0 or last)
            if evaluate or save or benchmark or state.step % recipe.log_interval == 0:
                self.settle(pending, interval)
                pending = []
            if evaluate:
                self.validate()
            if save:
                self.save(stopped)
            if benchmark:
                self.score_downstream()
            faults.after_step(state.step)
        return stopped

    def score_downstream(self) -> None:
        """Benchmark scores of this step's weights (every rank scores; rank 0 logs), after the save so a
        stop or crash while scoring loses no step; their time is left out of the next tokens/s."""
        scores = downstream.score(self.engine, self.plan.objective.tokenizer_dir, self.recipe)
        if self.reporter:
            self.throughput.exclude(scores["downstream/seconds"])
            self.reporter.log(self.state.step, scores)

    def settle(self, pending: list, interval: Interval) -> None:
        """Read the pending steps' metrics back at once, then guard and log each step in order."""
        keys = [k for k in pending[0][2] if k not in GLOBAL_METRICS]
        means = self.rank_means([{k: metrics[k] for k in keys} for _, _, metrics in pending])
        same = torch.stack([torch.cat([metrics[k].reshape(-1) for k in GLOBAL_METRICS if k in metrics])
                            for _, _, metrics in pending])
        for (step, lr, _), row in zip(pending, torch.cat((means, same), dim=1).tolist()):
            values, (grad_norm, *spike) = dict(zip(keys, row)), row[len(keys):]
            interval.add(values, self.guard(step, values["objective"], grad_norm, spike))
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
