"""The one-command demo: corpus -> tokenizer -> shards -> DeepSpeed ZeRO-2 pre-training of the tiny
preset on 2 CPU processes -> HF export -> a generated sample [-> the evaluation table]. No network needed.

    python -m doge.demo [--workdir runs/demo] [--evaluate] [--FIELD VALUE]...   # extra flags go to doge/train.py

With --evaluate (or --eval-limit N) it then runs `python -m doge.evaluate --model WORKDIR/run/final`
on the local lm-eval tasks (five-shot, as the Doge cards) and writes the table to
WORKDIR/run/eval/results.{md,json}; the evaluation files are $DOGE_EVAL_DATA, else
../shared/data/eval, checked before training starts.

The corpus is ../shared/data/pretrain when present, else text that ships with Python itself
(the stdlib's documentation topics and source). Rerunning resumes or reuses what is finished.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_PRETRAIN = REPO.parent / "shared" / "data" / "pretrain"
PROMPT = "The king said"


def build_corpus(out: Path, shared: Path = SHARED_PRETRAIN) -> list[str]:
    """Text inputs for the tokenizer and shards: the shared corpus, or Python's own docs and source."""
    if shared.is_dir():
        return [str(p) for p in sorted(shared.glob("*.txt"))]
    import pydoc_data.topics

    out.mkdir(parents=True, exist_ok=True)
    (out / "python_doc_topics.txt").write_text("\n\n".join(pydoc_data.topics.topics.values()))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (out / "python_stdlib_source.txt").write_text(
        "\n\n".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))))
    return [str(out / "python_doc_topics.txt"), str(out / "python_stdlib_source.txt")]


def step(title: str, cmd: list[str], env: dict) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def sample(final: Path) -> str:
    """Greedy continuation of PROMPT by the exported model, through stock transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=48, do_sample=False, repetition_penalty=1.3,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def evaluate_cmd(final: Path, limit: int | None) -> list[str]:
    """The evaluation step, also printed as the one-liner when the demo runs without it."""
    return [sys.executable, "-m", "doge.evaluate", "--model", str(final), *(["--limit", str(limit)] if limit else [])]


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The demo's own flags; the rest go to doge/train.py (no abbreviations: a trainer flag's prefix
    must not be taken for a demo flag)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"), help="where everything is written")
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed processes (default 2)")
    parser.add_argument("--evaluate", action="store_true", help="after the export, write its evaluation table "
                        "(python -m doge.evaluate on the local tasks) to WORKDIR/run/eval/results.{md,json}")
    parser.add_argument("--eval-limit", type=int, metavar="N", help="evaluate (implies --evaluate) on only the "
                        "first N items of each task (MMLU: of each subject); default: every item")
    args, train_flags = parser.parse_known_args(argv)
    args.evaluate = args.evaluate or args.eval_limit is not None
    return args, train_flags


def evaluation_problem(args: argparse.Namespace) -> str | None:
    """Why the requested evaluation could not run, found before the minutes of training, not after."""
    if args.eval_limit is not None and args.eval_limit < 1:
        return f"--eval-limit {args.eval_limit}: give a number of items of at least 1"
    if args.evaluate:
        from doge.eval_tasks.local_data import data_dir

        if not data_dir().is_dir():
            return (f"--evaluate: no evaluation data folder {data_dir()}; set DOGE_EVAL_DATA to the folder of "
                    "the local evaluation files (arc_easy.jsonl, ..., mmlu/)")
    return None


def main(argv=None) -> int:
    args, train_flags = parse_args(argv)
    problem = evaluation_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    work, started = Path(args.workdir).resolve(), time.time()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
               WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), PYTHONPATH=str(REPO))
    inputs = build_corpus(work / "corpus")
    if not (work / "tokenizer").is_dir():
        step("train a tokenizer", [sys.executable, "data_tools/train_tokenizer.py", "--input", *inputs,
                                   "--vocab-size", "4096", "--output", str(work / "tokenizer")], env)
    if not (work / "data").is_dir():
        step("tokenize, pack and shard", [sys.executable, "data_tools/prepare.py", "--input", *inputs,
                                          "--tokenizer", str(work / "tokenizer"), "--seq-len", "128",
                                          "--val-fraction", "0.01", "--val-rows", "256",
                                          "--output", str(work / "data")], env)
    step("pre-train doge-tiny with DeepSpeed ZeRO-2",
         ["deepspeed", "--num_gpus", str(args.ranks), "doge/train.py", "--deepspeed", "ds_configs/zero2.json",
          "--recipe", "recipes/doge-tiny.yaml", "--data", str(work / "data"), "--output", str(work / "run"),
          *train_flags], env)
    final = work / "run" / "final"
    print(f"\n=== sample from {final}\n{sample(final)}")
    if args.evaluate:
        step("evaluate the export on the local lm-eval tasks", evaluate_cmd(final, args.eval_limit), env)
    else:
        print(f"\nevaluation table (or rerun the demo with --evaluate): {' '.join(evaluate_cmd(final, None))}")
    print(f"\ndemo finished in {time.time() - started:.0f} s; loss curve: {work / 'run' / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
