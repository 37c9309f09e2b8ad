"""One task of a data-preparation job array: prepare.py on a disjoint part of the inputs, then,
once every part is done, one DATADIR over all of them.

    python data_tools/prepare_parts.py --task I --tasks N --input SRC... --output DATADIR -- [prepare.py flags]

The inputs (files, folders, globs) are listed once into sorted files; each file is a unit, prepared
on its own into DATADIR/parts/part-NNNNN by prepare.py, and task I takes the units I, I+N, I+2N, ...
The first task to start records the unit list and N in DATADIR/parts/plan.json; later tasks (a
rerun of one failed task included, whatever its own array size) follow that plan, and refuse
inputs that changed since. A part is the same bytes whichever task made it, so the combined
DATADIR does not depend on N: its manifest.json lists every part's shards in unit order (train
and val), with the tokenizer copy of part 0. prepare.py resumes an interrupted part, so a killed
task rerun alone finishes its parts; whichever task completes the last part writes the manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from doge.atomic import write_json  # noqa: E402
from doge.data import DataError  # noqa: E402
from doge.data.chunk_plan import resolve_files  # noqa: E402
from doge.data.shards import MANIFEST, read_manifest  # noqa: E402


def plan(parts: Path, inputs: list[str], tasks: int) -> dict:
    units = sorted({str(f.resolve()) for spec in inputs for f in resolve_files(spec)})
    path = parts / "plan.json"
    if not path.is_file():
        parts.mkdir(parents=True, exist_ok=True)
        try:  # exclusive create: of tasks starting together, one plan wins
            with open(path, "x") as f:
                json.dump({"tasks": tasks, "units": units}, f, indent=1)
        except FileExistsError:
            pass
    recorded = json.loads(path.read_text())
    if recorded["units"] != units:
        raise DataError(f"{path}: the inputs changed since this preparation started ({len(recorded['units'])} "
                        f"files then, {len(units)} now); prepare into a new --output")
    return recorded


def part_dir(parts: Path, unit: int) -> Path:
    return parts / f"part-{unit:05d}"


def combine(output: Path, parts: Path, units: list[str]) -> dict:
    """DATADIR/manifest.json over every part's shards, in unit order."""
    manifests = [read_manifest(part_dir(parts, i)) for i in range(len(units))]
    first = manifests[0]
    for i, m in enumerate(manifests):
        if (m["tokenizer"]["fingerprint"], m["seq_len"], m["dtype"]) != (first["tokenizer"]["fingerprint"],
                                                                         first["seq_len"], first["dtype"]):
            raise DataError(f"{part_dir(parts, i)}: tokenizer, seq_len or dtype differ from part 0's")
    combined = dict(first, command=[sys.executable, *sys.argv], sources=[], splits={},
                    pad_tokens=sum(m.get("pad_tokens", 0) for m in manifests))
    for split in first["splits"]:
        shards = [dict(e, file=f"parts/{part_dir(parts, i).name}/{e['file']}")
                  for i, m in enumerate(manifests) for e in m["splits"][split]["shards"]]
        combined["splits"][split] = {"rows": sum(e["rows"] for e in shards), "shards": shards,
                                     "tokens": sum(e["tokens"] for e in shards)}
    combined["sources"] = [s for m in manifests for s in m["sources"]]
    if not (output / "tokenizer").is_dir():  # staged per process: two last tasks may get here together
        staged = output / f"tokenizer.partial-{os.getpid()}"
        shutil.copytree(part_dir(parts, 0) / "tokenizer", staged)
        try:
            staged.rename(output / "tokenizer")
        except OSError:
            shutil.rmtree(staged)
    write_json(output / MANIFEST, combined)
    return combined


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, prepare_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=int, required=True, help="this task's index, 0 .. tasks-1")
    parser.add_argument("--tasks", type=int, required=True, help="number of tasks (the plan's, once recorded)")
    parser.add_argument("--input", nargs="+", required=True, metavar="SRC")
    parser.add_argument("--output", required=True, type=Path, metavar="DATADIR")
    args = parser.parse_args(own)
    parts = args.output / "parts"
    try:
        recorded = plan(parts, args.input, args.tasks)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    units, tasks = recorded["units"], recorded["tasks"]
    if not 0 <= args.task < tasks:
        print(f"error: --task {args.task} is outside the plan's {tasks} tasks (0-{tasks - 1})", file=sys.stderr)
        return 2
    mine = range(args.task, len(units), tasks)
    print(f"prepare_parts: task {args.task} of {tasks}: units {list(mine)} of {len(units)}", flush=True)
    for unit in mine:
        if (part_dir(parts, unit) / MANIFEST).is_file():
            print(f"prepare_parts: part {unit} is already complete", flush=True)
            continue
        cmd = [sys.executable, str(REPO / "data_tools" / "prepare.py"), "--input", units[unit],
               "--output", str(part_dir(parts, unit)), *prepare_flags]
        done = subprocess.run(cmd)
        if done.returncode:
            print(f"error: part {unit} ({units[unit]}): prepare.py exited {done.returncode}; rerun this task",
                  file=sys.stderr)
            return done.returncode
    missing = [i for i in range(len(units)) if not (part_dir(parts, i) / MANIFEST).is_file()]
    if missing:
        owners = sorted({i % tasks for i in missing})
        print(f"prepare_parts: task {args.task} done; parts {missing} not yet complete (tasks {owners})", flush=True)
        return 0
    try:
        combined = combine(args.output, parts, units)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"prepare_parts: {args.output} complete: {len(units)} parts, {combined['splits']['train']['rows']} train "
          f"rows", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
