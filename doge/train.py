"""Pre-train a Doge model with DeepSpeed: `deepspeed [--num_gpus N] doge/train.py --deepspeed
ds_configs/zero2.json --recipe recipes/doge-160m.yaml --data DATADIR --output RUNDIR [--field value]...`

Also runs under `torchrun` and as `python doge/train.py` (one process); on CPU set DS_ACCELERATOR=cpu.
Starting on a RUNDIR that holds a complete checkpoint resumes from it, on any world size.
SIGUSR1/SIGTERM: finish the current step, save, exit 0 (`python -m doge.launch` in place of
`deepspeed` makes the launcher exit 0 too: DeepSpeed's own runner dies of SIGUSR1).
A config that cannot run is reported as one `error: ...` line (exit 2) before anything starts.

This file is only the entry point: the loop, engine and checks live in `doge/training/`, the
pre-training objective in `doge/training/pretrain.py`.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed doge/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from doge.training.cli import main  # noqa: E402
from doge.training.pretrain import PretrainObjective  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(PretrainObjective, __doc__))
