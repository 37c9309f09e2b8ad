"""Supervised fine-tuning (SFT) on chat data: `deepspeed doge/sft.py --deepspeed ds_configs/zero2.json --recipe
recipes/sft-doge-20m.yaml --model EXPORT_OR_CHECKPOINT --data CHAT_DATADIR --output RUNDIR [--field value]...`

CHAT_DATADIR comes from `data_tools/prepare_chat.py --kind sft`; only the assistant turns carry loss.
--model is the pre-trained model: an HF export (RUNDIR/final) or a checkpoint folder. Everything
else (resume, signals, checkpoints, export to RUNDIR/final) is the pre-training trainer's: see doge/train.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed doge/sft.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from doge.training.cli import main  # noqa: E402
from doge.training.posttrain import SFTObjective  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(SFTObjective, __doc__))
