"""Does upcycling pay? A dense model continued dense against the same model upcycled to CDMoE.

    python benchmarks/upcycle_gain.py [--variants 1024:16,256:8] [--dense-steps 400] [--steps 300]

1. A dense doge-tiny is trained on domain A (prose) through its stable phase only (no decay): the
   starting point a WSD run hands over for continued training.
2. From its export, on the same tokens of a new domain B (code) and the same schedule (re-warmup,
   then linear decay to 0): (a) dense, (b) upcycled to CDMoE with each --variants EXPERTS:TOP_K
   (`--upcycle-experts/--upcycle-top-k`: the MLPs become the shared experts, the routed output
   starts at zero, so step 1 is the dense model's loss).
3. Each result is scored by its mean next-token loss (nats) on held-out text of both domains, and
   the table gives the training-loss curve (every --log-every steps), the share of experts in use
   at the end, and tokens/s (the median of the logged intervals after the first).

Every run is a real `deepspeed` launch of doge/train.py (2 ranks, ZeRO-2, fp32 on CPU). Data: prose
is ../shared/data/pretrain's Tiny Shakespeare + TinyStories (held out: its WikiText-2 test text),
code its TheAlgorithms/Python files (the last tenth held out). Without that folder the script says
so and uses Python's documentation topics as prose and the standard library's source as code.
The same script is the recipe for a larger preset on a GPU: --preset doge-20m and more steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from model_quality import SHARED, heldout_loss, launch, prepare


def corpora(work: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """(domain A training files, domain B training files, {held-out name: text})."""
    work.mkdir(parents=True, exist_ok=True)
    code_train = work / "code_train.jsonl"
    if (SHARED / "python_edu_thealgorithms.jsonl").is_file():
        rows = [json.loads(line) for line in (SHARED / "python_edu_thealgorithms.jsonl").open()]
        prose = [str(SHARED / "tinyshakespeare.txt"), str(SHARED / "tinystories_val.txt")]
        held_prose = (SHARED / "wikitext2_test.raw").read_text()
    else:
        print(f"note: {SHARED} not found; prose is Python's documentation topics, code the standard library")
        import pydoc_data.topics

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        rows = [{"text": p.read_text(errors="replace")} for p in sorted(stdlib.glob("*.py"))]
        topics = list(pydoc_data.topics.topics.values())
        cut = len(topics) * 9 // 10
        (work / "prose_train.txt").write_text("\n\n".join(topics[:cut]))
        prose, held_prose = [str(work / "prose_train.txt")], "\n\n".join(topics[cut:])
    cut = len(rows) * 9 // 10
    code_train.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[:cut]))
    held_code = "\n\n".join(r["text"] for r in rows[cut:])
    return prose, [str(code_train)], {"prose": held_prose, "code": held_code}


def train(data: Path, rundir: Path, args, *flags: str) -> Path:
    return launch(data, rundir, "--model", args.preset, "--save-interval", "0", "--keep-last", "1",
                  "--log-interval", str(args.log_every), "--lr", str(args.lr), *flags)


def continuation(args, upcycle: tuple[int, int] | None) -> list[str]:
    """The continued run's flags: same start, tokens and schedule for every variant."""
    flags = ["--max-steps", str(args.steps), "--warmup-steps", str(args.warmup), "--decay-steps",
             str(args.steps - args.warmup)]
    if upcycle:
        flags += ["--upcycle-experts", str(upcycle[0]), "--upcycle-top-k", str(upcycle[1]),
                  "--aux-loss-weight", str(args.aux_loss_weight), "--expert-lr-scale", str(args.expert_lr_scale)]
    return flags


def curve(rundir: Path) -> list[dict]:
    return [line for line in map(json.loads, (rundir / "metrics.jsonl").open()) if "loss" in line]


def score(name: str, rundir: Path, held: dict[str, str], args) -> dict:
    lines = curve(rundir)
    row = {"name": name, "rundir": str(rundir), "curve": [(line["step"], line["loss"]) for line in lines],
           "experts_used": lines[-1].get("experts_used"),
           "tokens_per_s": statistics.median(line["tokens_per_s"] for line in lines[1:] or lines)}
    for domain, text in held.items():
        row[domain] = heldout_loss(rundir / "final", text, args.windows)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="1024:16", help="upcycled variants, EXPERTS:TOP_K[,EXPERTS:TOP_K...]")
    p.add_argument("--preset", default="doge-tiny", help="model preset of the dense start")
    p.add_argument("--dense-steps", type=int, default=400, help="stable-phase steps of the dense start on prose")
    p.add_argument("--steps", type=int, default=300, help="steps of every continuation on code (16 x 128 tokens)")
    p.add_argument("--warmup", type=int, default=15, help="re-warmup steps of the continuations")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every run")
    p.add_argument("--expert-lr-scale", type=float, default=1.0,
                   help="LR multiplier of the upcycled models' router and expert tables")
    p.add_argument("--aux-loss-weight", type=float, default=0.001, help="load-balancing loss weight (upcycled)")
    p.add_argument("--log-every", type=int, default=25, help="steps between the curve's points")
    p.add_argument("--windows", type=int, default=200, help="held-out windows of 128 tokens scored per domain")
    p.add_argument("--work", type=Path, default=Path("/tmp/doge-upcycle-gain"), help="scratch folder (reused)")
    p.add_argument("--json", type=Path, help="also write the rows (with curves) here")
    args = p.parse_args(argv)
    variants = [tuple(int(x) for x in v.split(":")) for v in args.variants.split(",")]
    started = time.time()
    prose, code, held = corpora(args.work)
    prose_data = prepare(args.work, prose, "prose", tokenizer_inputs=prose + code)
    code_data = prepare(args.work, code, "code")
    start = train(prose_data, args.work / "dense-start", args, "--max-steps", str(args.dense_steps),
                  "--warmup-steps", str(args.dense_steps // 20), "--decay-steps", "0") / "final"
    rows = [score("dense start (no continuation)", start.parent, held, args)]
    tag = f"{args.steps}-{args.warmup}-{args.lr:g}"
    runs = [("dense, continued", f"dense-{tag}", None)]
    scale = f", expert LR x{args.expert_lr_scale:g}" if args.expert_lr_scale != 1 else ""
    runs += [(f"upcycled {e} experts top {k}{scale}, continued", f"moe{e}x{k}-{tag}-aux{args.aux_loss_weight:g}"
               + (f"-elr{args.expert_lr_scale:g}" if args.expert_lr_scale != 1 else ""), (e, k))
             for e, k in variants]
    for name, folder, upcycle in runs:
        rundir = train(code_data, args.work / folder, args, "--model", str(start), *continuation(args, upcycle))
        rows.append(score(name, rundir, held, args))
    print(f"\n| model | held-out code | held-out prose | experts used | tok/s | training loss at steps "
          f"{', '.join(str(s) for s, _ in rows[1]['curve'])} |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        used = "" if row["experts_used"] is None else f"{row['experts_used']:.0%}"
        points = ", ".join(f"{loss:.3f}" for _, loss in row["curve"]) if row is not rows[0] else ""
        print(f"| {row['name']} | {row['code']:.4f} | {row['prose']:.4f} | {used} | {row['tokens_per_s']:,.0f} | "
              f"{points} |")
    dense = rows[1]["code"]
    for row in rows[2:]:
        print(f"{row['name']}: {dense - row['code']:+.4f} nats on held-out code against dense")
    print(f"\n{args.steps} continuation steps x {16 * 128} tokens; {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
