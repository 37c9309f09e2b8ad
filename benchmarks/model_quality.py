"""Model quality levers measured on held-out text at equal tokens (tiny preset, CPU).

    python benchmarks/model_quality.py --experiment {averaging,doc-mask,seeds,spike-guard} [--steps 400]

Each experiment trains doge-tiny with DeepSpeed on the same prepared data and token budget, then
scores exports by their mean next-token loss (nats) on held-out text from corpora the runs never
saw. Experiments:
  averaging   one run that saves a checkpoint every --save-every steps through the WSD decay;
              the export of the last checkpoint against `python -m doge.average RUNDIR --last K`
              for K = 2, 3, 5.
  doc-mask    document masking off, on with RoPE positions continuing along the row, on with
              positions restarting per document (--doc-mask, --doc-positions).
  seeds       the run with every lever off at seeds 0, 1, 2: the spread of chance.
  spike-guard injected loss spikes (DOGE_FAULT_SPIKE_STEPS) trained on with the guard off and
              skipped with it on (--spike-sigma 6), against a run without spikes.

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
import socket
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


def run(cmd: list[str], **extra_env: str) -> None:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), WANDB_MODE="offline",
               PYTHONPATH=str(REPO), **extra_env)
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path, inputs: list[str], name: str = "data", tokenizer_inputs: list[str] | None = None) -> Path:
    """Shards of `inputs` in work/NAME, tokenized by work/tokenizer (trained on `tokenizer_inputs`,
    default `inputs`); each made once per work folder."""
    if not (work / "tokenizer").is_dir():
        run([sys.executable, "data_tools/train_tokenizer.py", "--input", *(tokenizer_inputs or inputs),
             "--vocab-size", "4096", "--output", str(work / "tokenizer")])
    if not (work / name).is_dir():
        run([sys.executable, "data_tools/prepare.py", "--input", *inputs, "--tokenizer", str(work / "tokenizer"),
             "--seq-len", str(SEQ_LEN), "--output", str(work / name)])
    return work / name


def launch(data: Path, rundir: Path, *flags: str, **env: str) -> Path:
    """doge-tiny on 2 ranks (a free port: benchmarks may run side by side), ZeRO-2, fp32, unless
    RUNDIR finished before; `env`: extra environment (fault injection)."""
    if not (rundir / "final").is_dir():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "doge/train.py", "--deepspeed",
             "ds_configs/zero2.json", "--recipe", "recipes/doge-tiny.yaml", "--data", str(data), "--output",
             str(rundir), "--precision", "fp32", "--eval-interval", "0", "--wandb", "off", *flags], **env)
    return rundir


def train(data: Path, rundir: Path, steps: int, *flags: str, **env: str) -> Path:
    """WSD with the last fifth of the steps as decay."""
    return launch(data, rundir, "--max-steps", str(steps), "--warmup-steps", str(steps // 20), "--decay-steps",
                  str(steps // 5), "--log-interval", "50", *flags, **env)


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


def compare(work: Path, data: Path, held: dict[str, str], args, runs: list[tuple[str, str, list[str], dict]]
            ) -> list[dict]:
    """One run per (name, folder, flags, environment), all on the same data and schedule, scored."""
    rows = []
    for name, folder, flags, env in runs:
        rundir = train(data, work / folder, args.steps, *flags, **env)
        rows.append(dict(name=name, model=str(rundir / "final"),
                         command=" ".join([*(f"{k}={v}" for k, v in env.items()), "doge/train.py ...", *flags])))
    for row in rows:
        for held_name, text in held.items():
            row[held_name] = heldout_loss(Path(row["model"]), text, args.windows)
    return rows


def doc_mask(work: Path, data: Path, held: dict[str, str], args) -> list[dict]:
    return compare(work, data, held, args, [
        ("doc mask off", "doc-mask-off", [], {}),
        ("doc mask on, positions continue", "doc-mask-continue", ["--doc-mask", "true"], {}),
        ("doc mask on, positions restart", "doc-mask-restart",
         ["--doc-mask", "true", "--doc-positions", "restart"], {})])


def spike_guard(work: Path, data: Path, held: dict[str, str], args) -> list[dict]:
    """The same injected spikes (the loss of every 25th step of the stable phase after the guard's
    window, times the injection's factor) with the guard off and on."""
    spikes = ",".join(str(s) for s in range(args.steps // 4, args.steps * 4 // 5, 25))
    env = {"DOGE_FAULT_SPIKE_STEPS": spikes}
    return compare(work, data, held, args, [
        ("no spikes, guard off", "spike-none", [], {}),
        (f"spikes at steps {spikes}, guard off", "spike-off", [], env),
        (f"spikes at steps {spikes}, guard on", "spike-on", ["--spike-sigma", "6"], env)])


def seeds(work: Path, data: Path, held: dict[str, str], args) -> list[dict]:
    """The same run (all levers off) with other seeds: how far apart runs land by chance, the
    spread any lever's difference is to be read against."""
    return compare(work, data, held, args, [(f"seed {seed}", f"seed-{seed}", ["--seed", str(seed)], {})
                                            for seed in (0, 1, 2)])


EXPERIMENTS = {"averaging": averaging, "doc-mask": doc_mask, "spike-guard": spike_guard, "seeds": seeds}


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
