"""The process group: who this rank is, and the few collectives the loop needs.

`world_from_env` reads the world size the launcher chose (deepspeed and torchrun export
WORLD_SIZE) without starting anything, so configuration checks can use it before any process
group exists. srun exports no rank variables: `srun -n 4 python doge/train.py` would start 4
independent 1-rank runs on one --output, so several srun tasks without WORLD_SIZE/RANK are refused.
A plain 1-rank run picks a free rendezvous port (`init_distributed`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from doge.training.recipe import ConfigError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_world: int  # ranks on this node (they share its cores on CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> int:
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or "1")  # set inside an srun step only
    if tasks > 1 and "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        raise ConfigError(f"srun started {tasks} tasks but no launcher gave them ranks (no WORLD_SIZE/RANK): "
                          "each would train alone on the same --output; start one launcher per node instead: "
                          "sbatch slurm/pretrain_20m.sh (it runs srun --ntasks-per-node=1 python -m doge.launch ...), "
                          "or srun -n 1 for a single rank")
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


DEFAULT_PORT = "29511"  # MASTER_PORT of a multi-rank job whose launcher set none


def init_distributed() -> Dist:
    """Start the process group (gloo on CPU, nccl on GPUs); a plain `python` run is a 1-rank job.

    A 1-rank run without MASTER_PORT (plain `python doge/train.py`) lets its store bind port 0, a
    free port the kernel picks, as `torchrun --standalone` does: two such runs on one host never
    collide, and nothing else can take the port between choosing and binding it."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    alone = "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0" if alone else DEFAULT_PORT)):
        os.environ.setdefault(key, default)
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    if alone:  # the port the store was given, for anything that reads MASTER_PORT later
        store = dist.distributed_c10d._get_default_store()
        port = getattr(getattr(store, "underlying_store", store), "port", None)
        if port:
            os.environ["MASTER_PORT"] = str(port)
    if not on_cpu:  # host flags travel over gloo, so agreeing on them never waits for the GPU
        _host_group.append(dist.new_group(backend="gloo"))
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:  # the launcher may not split the cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    return Dist(dist.get_rank(), dist.get_world_size(), local_world)


_host_group: list = []  # a gloo group beside nccl; on CPU the default (gloo) group serves


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank: a host-side collective (the value never touches the
    device, so asking every step costs no device synchronisation)."""
    import numpy as np
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    value = np.array([float(flag)], dtype=np.float32)
    dist.all_reduce(torch.from_numpy(value), group=_host_group[0] if _host_group else None)
    return bool(value[0] > 0)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in one collective (a no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
