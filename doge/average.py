"""Average the weights of checkpoints of one run into a Hugging Face folder.

    python -m doge.average RUNDIR --last 3 --output RUNDIR/average-3
    python -m doge.average CKPT CKPT [CKPT ...] --output OUTDIR

The mean of the checkpoints' fp32 weights (any ZeRO stage, any world size, expert tables whole),
written as `python -m doge.export` writes one checkpoint (config.json, fp32 safetensors, the
tokenizer of the newest checkpoint), loadable by stock `transformers`. Averaging the last
checkpoints of the decay phase often gives a slightly better model at no training cost; measure
it on held-out text (`benchmarks/model_quality.py`). Checkpoints of different model configs are
refused. OUTDIR must be new; it is written beside its place and renamed into it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path, metavar="RUNDIR_OR_CKPT",
                   help="one RUNDIR (with --last) or two or more checkpoint folders RUNDIR/checkpoints/step-XXXXXXXX")
    p.add_argument("--last", type=int, metavar="K", help="with a RUNDIR: average its newest K complete checkpoints")
    p.add_argument("--output", type=Path, required=True, metavar="OUTDIR", help="new folder for the averaged export")
    return p.parse_args(argv)


def checkpoints(args: argparse.Namespace) -> list[Path]:
    """The checkpoint folders the arguments name (AverageError when they name none to average)."""
    from doge.training.average import AverageError, last_checkpoints

    if args.last is not None:
        if len(args.sources) != 1:
            raise AverageError(f"--last {args.last} takes one RUNDIR, got {len(args.sources)} paths; pass one RUNDIR "
                               "with --last, or the checkpoint folders without it")
        return last_checkpoints(args.sources[0], args.last)
    if len(args.sources) < 2:
        raise AverageError(f"{args.sources[0]}: give two or more checkpoint folders, or a RUNDIR with --last K")
    return list(args.sources)


def main(argv=None) -> int:
    args = parse_args(argv)
    from doge.command import run_command
    from doge.training.average import AverageError, average
    from doge.training.export import ExportError

    return run_command(lambda: f"wrote {average(checkpoints(args), args.output)}", (AverageError, ExportError),
                       "--output", args.output)


if __name__ == "__main__":
    sys.exit(main())
