"""Trainer throughput: tokens/s, MFU and where a step's time goes, on real 2-rank DeepSpeed runs.

    python benchmarks/train_speed.py --data DATADIR [--presets doge-tiny doge-20m] [--steps 12]

Each case runs doge/train.py under torchrun (ZeRO-2, fp32 and bf16) with DeepSpeed's
wall_clock_breakdown on, then reports the median tokens/s and MFU of the measured steps (the first
two are warm-up) and DeepSpeed's per-step split into forward, backward (compute vs gradient
all-reduce/reduce-scatter) and optimizer step. Data loading is timed separately with the same
`rank_batch` calls the trainer makes. DATADIR needs seq_len >= --seq-len.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMERS = ("fwd_microstep", "bwd_inner_microstep", "bwd_allreduce_microstep", "step_microstep")


def run_case(data: str, preset: str, precision: str, steps: int, seq_len: int, micro: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
        config["wall_clock_breakdown"] = True
        (Path(tmp) / "ds.json").write_text(json.dumps(config))
        cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "doge/train.py", "--deepspeed",
               str(Path(tmp) / "ds.json"), "--recipe", "recipes/doge-tiny.yaml", "--data", data, "--output",
               str(Path(tmp) / "run"), "--model", preset, "--precision", precision, "--max-steps", str(steps),
               "--seq-len", str(seq_len), "--micro-batch-size", str(micro), "--global-batch-tokens",
               str(batch * seq_len), "--warmup-steps", "1", "--decay-steps", "1", "--log-interval", "1",
               "--save-interval", "0", "--eval-interval", "0", "--export", "false", "--wandb", "off"]
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
                   TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                       str(REPO / ".cache" / "torch_extensions")))
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][2:]
    split = {t: statistics.median(map(float, re.findall(rf"{t}: ([\d.]+)", done.stdout + done.stderr)) or [0.0])
             for t in TIMERS}
    return dict(preset=preset, precision=precision, tokens_per_s=statistics.median(r["tokens_per_s"] for r in lines),
                mfu=statistics.median(r["mfu"] for r in lines), ms_per_microstep=split)


def data_ms_per_step(data: str, steps: int, seq_len: int, batch: int) -> float:
    sys.path.insert(0, str(REPO))
    from doge.data import open_pretrain_data

    source = open_pretrain_data(data)
    started = time.perf_counter()
    for step in range(steps):
        for rank in range(2):
            source.rank_batch(step * batch, batch, rank, 2)[:, :seq_len]
    return 1000 * (time.perf_counter() - started) / steps / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared DATADIR (tokenizer vocab <= 4096 for doge-tiny)")
    parser.add_argument("--presets", nargs="+", default=["doge-tiny", "doge-20m"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=16, help="samples per step")
    args = parser.parse_args()
    print(f"data loading: {data_ms_per_step(args.data, 50, args.seq_len, args.global_batch):.2f} ms per rank per step")
    for preset in args.presets:
        for precision in args.precisions:
            result = run_case(args.data, preset, precision, args.steps, args.seq_len, args.micro_batch_size,
                              args.global_batch)
            split = ", ".join(f"{k.replace('_microstep', '')} {v:.1f}" for k, v in result["ms_per_microstep"].items())
            print(f"{preset:10s} {precision}: {result['tokens_per_s']:8,.0f} tok/s  MFU {100 * result['mfu']:.2f}%  "
                  f"ms per micro-step: {split}", flush=True)


if __name__ == "__main__":
    main()
