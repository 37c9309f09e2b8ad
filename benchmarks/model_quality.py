"""Model quality levers measured on held-out text at equal tokens (tiny preset, CPU).

    python benchmarks/model_quality.py --experiment averaging [--steps 400] [--work /tmp/doge-quality]

Each experiment trains doge-tiny with DeepSpeed on the same prepared data and token budget, then
scores exports by their mean next-token loss (nats) on held-out text from corpora the runs never
saw. Experiments:
  averaging   one run that saves a checkpoint every --save-every steps through the WSD decay;
              the export of the last checkpoint against `python -m doge.average RUNDIR --last K`
              for K = 2, 3, 5.

Data: trained on ../shared/data/pretrain's Tiny Shakespeare and TinyStories, held out on its
WikiText-2 test text (a corpus the run never saw). Without that folder the script says so and
trains on Python's own documentation topics, holding out the standard library's source.
Prints a table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "pretrain"
SEQ_LEN = 128


def corpora(work: Path) -> tuple[list[str], dict[str, str]]:
    """(training text files, {held-out name: text})."""
    if (SHARED / "tinyshakespeare.txt").is_file():
        held = (SHARED / "wikitext2_test.raw").read_text()
        return [str(SHARED / "tinyshakespeare.txt"), str(SHARED / "tinystories_val.txt")], {"wikitext2": held}
    print(f"note: {SHARED} not found; training on Python's documentation topics, holding out stdlib source")
    import pydoc_data.topics

    work.mkdir(parents=True, exist_ok=True)
    train = work / "python_doc_topics.txt"
    train.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = "\n\n".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:60])
    return [str(train)], {"stdlib-source": held}


def run(cmd: list[str]) -> None:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), WANDB_MODE="offline",
               PYTHONPATH=str(REPO))
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, inputs: list[str]) -> Path:
    """Tokenizer and shards, made once per work folder."""
    if not (work / "tokenizer").is_dir():
        run([sys.executable, "data_tools/train_tokenizer.py", "--input", *inputs, "--vocab-size", "4096",
             "--output", str(work / "tokenizer")])
    if not (work / "data").is_dir():
        run([sys.executable, "data_tools/prepare.py", "--input", *inputs, "--tokenizer", str(work / "tokenizer"),
             "--seq-len", str(SEQ_LEN), "--output", str(work / "data")])
    return work / "data"


def train(data: Path, rundir: Path, steps: int, *flags: str) -> Path:
    """doge-tiny on 2 ranks, ZeRO-2, fp32; WSD with the last fifth of the steps as decay."""
    if not (rundir / "final").is_dir():
        run(["deepspeed", "--num_gpus", "2", "doge/train.py", "--deepspeed", "ds_configs/zero2.json",
             "--recipe", "recipes/doge-tiny.yaml", "--data", str(data), "--output", str(rundir),
             "--max-steps", str(steps), "--warmup-steps", str(steps // 20), "--decay-steps", str(steps // 5),
             "--precision", "fp32", "--eval-interval", "0", "--wandb", "off", "--log-interval", "50", *flags])
    return rundir


def heldout_loss(model_dir: Path, text: str, windows: int) -> float:
    """Mean next-token loss (nats) of an export over the first `windows` windows of SEQ_LEN tokens."""
    from transformers import AutoTokenizer

    from doge import DogeForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = DogeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(tok(text)["input_ids"][: windows * SEQ_LEN])
    batch = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in batch.split(16):
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            total, count = total + loss.item() * chunk.numel(), count + chunk.numel()
    return total / count


def averaging(work: Path, data: Path, held: dict[str, str], args) -> list[dict]:
    rundir = train(data, work / "averaging", args.steps, "--save-interval", str(args.save_every), "--keep-last", "0")
    rows = [dict(name="last checkpoint", model=str(rundir / "final"),
                 command=f"{rundir}/final (the run's own export)")]
    for k in (2, 3, 5):
        out = rundir / f"average-{k}"
        if not out.is_dir():
            run([sys.executable, "-m", "doge.average", str(rundir), "--last", str(k), "--output", str(out)])
        rows.append(dict(name=f"average of the last {k}", model=str(out),
                         command=f"python -m doge.average {rundir} --last {k} --output {out}"))
    for row in rows:
        for name, text in held.items():
            row[name] = heldout_loss(Path(row["model"]), text, args.windows)
    return rows


EXPERIMENTS = {"averaging": averaging}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=sorted(EXPERIMENTS), required=True, help="which lever to measure")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (16 x 128 tokens each)")
    p.add_argument("--save-every", type=int, default=16, help="averaging: checkpoint interval in steps")
    p.add_argument("--windows", type=int, default=200, help="held-out windows of 128 tokens scored per corpus")
    p.add_argument("--work", type=Path, default=Path("/tmp/doge-quality"), help="scratch folder (reused)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    started = time.time()
    inputs, held = corpora(args.work)
    rows = EXPERIMENTS[args.experiment](args.work, prepare(args.work, inputs), held, args)
    names = list(held)
    print(f"\n| {args.experiment} | " + " | ".join(f"{n} loss" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        print(f"| {row['name']} | " + " | ".join(f"{row[n]:.4f}" for n in names) + " |")
    print(f"\n{args.steps} steps x {16 * SEQ_LEN} tokens, {args.windows} x {SEQ_LEN} held-out tokens; "
          f"{time.time() - started:.0f} s; perplexity of the first row: {math.exp(rows[0][names[0]]):.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
