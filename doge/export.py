"""Export a training checkpoint to a Hugging Face folder: `python -m doge.export CKPT OUTDIR`.

CKPT is a `RUNDIR/checkpoints/step-XXXXXXXX` folder (any ZeRO stage, any world size, CDMoE expert
tables sharded or not: the export holds them whole). OUTDIR gets
fp32 safetensors, config.json and the tokenizer, loadable by stock
`transformers.AutoModelForCausalLM`. The export is written beside OUTDIR and renamed into place,
so an interrupted export never leaves a half-written OUTDIR.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from doge.training.export import export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint folder RUNDIR/checkpoints/step-XXXXXXXX "
                                     "(or RUNDIR/checkpoints/latest's target)")
    parser.add_argument("outdir", help="new folder for the Hugging Face export")
    args = parser.parse_args(argv)
    try:
        print(export(Path(args.ckpt), Path(args.outdir)))
    except (FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
