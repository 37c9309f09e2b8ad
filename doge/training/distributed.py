"""The process group: who this rank is, and the few collectives the loop needs.

`world_from_env` reads the world size the launcher chose (deepspeed, torchrun and SLURM's srun
all export WORLD_SIZE) without starting anything, so configuration checks can use it before any
process group exists.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def init_distributed() -> Dist:
    """Start the process group (gloo on CPU, nccl on GPUs); a plain `python` run is a 1-rank job."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, default)
    on_cpu = get_accelerator().device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if on_cpu and "OMP_NUM_THREADS" not in os.environ:  # the launcher may not split the cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    return Dist(dist.get_rank(), dist.get_world_size(), local_world)


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
