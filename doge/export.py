"""Export a training checkpoint to a Hugging Face folder: `python -m doge.export CKPT OUTDIR`.

CKPT is a `RUNDIR/checkpoints/step-XXXXXXXX` folder (any ZeRO stage, any world size, CDMoE expert
tables sharded or not: the export holds them whole), or a RUNDIR (or RUNDIR/checkpoints), which
exports its newest complete checkpoint. OUTDIR gets fp32 safetensors, config.json and the
tokenizer, loadable by stock `transformers.AutoModelForCausalLM`. The export is written beside
OUTDIR and renamed into place, so an interrupted export never leaves a half-written OUTDIR.

Refused with one `error: ...` line and exit 2, before the model or DeepSpeed is loaded: a CKPT
that does not exist, is a file, is already a Hugging Face export, or is not complete (a file its
manifest.json lists is missing or has another size: the trainer's own resume check); a RUNDIR
without a complete checkpoint; an OUTDIR that is a file, exists with files in it, or cannot be
created.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from doge.command import OneLineParser, run_command
from doge.training.export import ExportError, check_outdir, export, source_checkpoint


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m doge.export", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint folder RUNDIR/checkpoints/step-XXXXXXXX, or a "
                                                     "RUNDIR for its newest complete checkpoint")
    parser.add_argument("outdir", metavar="OUTDIR", help="new folder for the Hugging Face export")
    args = parser.parse_args(argv)

    def work() -> Path:
        ckpt = source_checkpoint(Path(args.ckpt))
        check_outdir(Path(args.outdir))
        if ckpt != Path(args.ckpt):
            print(f"exporting {ckpt}, the newest complete checkpoint in {args.ckpt}", flush=True)
        return export(ckpt, Path(args.outdir))
    return run_command(work, (ExportError,), "OUTDIR", args.outdir)


if __name__ == "__main__":
    sys.exit(main())
