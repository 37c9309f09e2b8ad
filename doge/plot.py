"""Loss and LR curves of a run: `python -m doge.plot RUNDIR` writes RUNDIR/loss.png from metrics.jsonl."""
from __future__ import annotations

import argparse

from doge.training.plot import plot


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rundir", help="run folder holding metrics.jsonl")
    print(plot(parser.parse_args(argv).rundir))


if __name__ == "__main__":
    main()
