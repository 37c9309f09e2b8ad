"""Direct preference optimisation (DPO, sigmoid loss): `deepspeed doge/dpo.py --deepspeed ds_configs/zero2.json
--recipe recipes/dpo-doge-20m.yaml --model SFT_EXPORT --data PREF_DATADIR --output RUNDIR [--beta 0.1]...`

PREF_DATADIR comes from `data_tools/prepare_chat.py --kind dpo`. --model must be an HF export (the
SFT model's RUNDIR/final): training starts from it and it stays loaded, frozen, as the reference.
Everything else (resume, signals, checkpoints, export) is the pre-training trainer's: see doge/train.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed doge/dpo.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from doge.training.cli import main  # noqa: E402
from doge.training.posttrain import DPOObjective  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(DPOObjective, __doc__))
