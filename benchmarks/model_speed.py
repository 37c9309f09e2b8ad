"""Ours vs stock `transformers.DogeForCausalLM`: same config (doge-20m), same weights, one run.

Measures training tokens/s at seq 2048 (forward + backward + AdamW; float32 and bf16 autocast;
with `--compile` also ours with its decoder layers and fused LM-head loss through torch.compile,
as the trainer's `--compile on` builds them, against ours eager in the same run, the cold compile
time, and with `--profile` the top operators of one eager and one compiled step),
greedy generation tokens/s (prompt 32, 128 new tokens, batch 1) and the peak memory of one
forward at 8192 tokens with keep_window_size 2048 (each in a fresh subprocess, peak RSS above the
loaded model). Prints a table with ratios ours/stock.

bf16 autocast rows need a CPU with native bf16 GEMMs (AVX512-BF16 / AMX) or a GPU. Where bf16 is
emulated (AVX2-only CPUs: 10-20x slower than fp32), one stock bf16 step at seq 2048 takes about
5 minutes, so `--bf16 auto` (the default) probes a GEMM and skips those rows there, saying so;
`--bf16 on` measures them anyway.

    python benchmarks/model_speed.py [--steps 3] [--preset doge-20m] [--bf16 auto|on|off] [--json OUT]
    python benchmarks/model_speed.py --compile --profile --train-only --bf16 off   # compiled vs eager
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import transformers

from doge import DogeConfig, DogeForCausalLM
from doge.model.generation import Decoder
from doge.training.compile import compile_model


def build_pair(preset: str, seed: int = 0, **overrides):
    """Our model and the stock one with identical weights."""
    torch.manual_seed(seed)
    ours = DogeForCausalLM(DogeConfig.from_preset(preset, **overrides))
    stock = transformers.DogeForCausalLM(transformers.DogeConfig(**ours.config.to_dict()))
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def train_step_fn(model, seq_len: int, bf16: bool, fused: bool):
    """One full optimizer step on one row of seq_len tokens, as a function."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    x = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    extra = {"skip_logits": True, "use_cache": False} if fused else {}

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def train_tokens_per_s(model, seq_len: int, steps: int, bf16: bool, fused: bool) -> float:
    """Tokens/s of full optimizer steps on one row of seq_len tokens (one warm-up step)."""
    step = train_step_fn(model, seq_len, bf16, fused)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * seq_len / (time.perf_counter() - start)


def top_operators(model, seq_len: int, count: int = 8) -> str:
    """The operators that take the time of one (warm) training step, by self CPU time."""
    from torch.profiler import profile

    step = train_step_fn(model, seq_len, False, True)
    step()
    with profile() as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=count)


BF16_EMULATED = 3.0  # native bf16 GEMMs run at least as fast as fp32; emulated ones 10-20x slower


def bf16_slowdown(n: int = 512, repeats: int = 3) -> float:
    """How many times slower a bf16 GEMM runs than the fp32 one on this CPU (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def best(x, y):
        x @ y
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) / best(a, b)


@torch.inference_mode()
def generate_tokens_per_s(contenders: dict, prompt, new_tokens: int, repeats: int, before_round=None) -> dict:
    """Best tokens/s of each `generate(prompt, n)` over `repeats` interleaved rounds: decoding is a
    chain of tiny ops whose thread pool stalls whenever another job holds a core, so a single
    timing on a shared machine says more about the neighbours than about the decoder.
    `before_round` (if given) runs at the start of every round, for a measurement that should see
    the same conditions as the contenders (the memory roofline's copy bandwidth)."""
    best = dict.fromkeys(contenders, 0.0)
    for generate in contenders.values():
        generate(prompt, 8)
    for _ in range(repeats):
        if before_round is not None:
            before_round()
        for name, generate in contenders.items():
            start = time.perf_counter()
            out = generate(prompt, new_tokens)
            assert out.shape[1] == prompt.shape[1] + new_tokens
            best[name] = max(best[name], new_tokens / (time.perf_counter() - start))
    return best


MEMORY_PROBE = """
import json, time, torch, transformers
from doge import DogeConfig, DogeForCausalLM
config = DogeConfig.from_preset({preset!r}, keep_window_size={window})
torch.manual_seed(0)
model = (DogeForCausalLM(config) if {which!r} == "ours" else
         transformers.DogeForCausalLM(transformers.DogeConfig(**config.to_dict()))).eval()
x = torch.randint(0, config.vocab_size, (1, {length}))
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
before = status("VmRSS:")
start = time.perf_counter()
with torch.no_grad():
    model(x, logits_to_keep={keep})
print(json.dumps({{"extra_mb": (status("VmHWM:") - before) / 1024, "seconds": time.perf_counter() - start}}))
"""


def forward_memory(which: str, preset: str, length: int, window: int, keep: int) -> dict:
    """Peak RSS of one no-grad forward above the loaded model, in a fresh process.

    keep=0 returns logits for every position (length x vocab floats: 1 GiB at 8192 tokens, the
    same for both models); keep=1 only the last position's, as a prefill does, so the attention
    and mask memory shows."""
    code = MEMORY_PROBE.format(preset=preset, window=window,
                               which=which, length=length, keep=keep)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="doge-20m", help="model preset (default doge-20m)")
    parser.add_argument("--seq-len", type=int, default=2048, help="training sequence length")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per measurement")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated tokens (prompt 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved decode rounds, best kept")
    parser.add_argument("--memory-len", type=int, default=8192, help="tokens of the memory probe forward")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast training rows: auto = only where bf16 GEMMs are native (see above)")
    parser.add_argument("--all-logits", action="store_true",
                        help="also probe the 8k forward returning every position's logits (+1 GiB for both)")
    parser.add_argument("--compile", action="store_true",
                        help="also train ours compiled (decoder layers + LM-head loss, fp32) against ours eager")
    parser.add_argument("--profile", action="store_true", help="with --compile: top operators of each step")
    parser.add_argument("--train-only", action="store_true", help="skip the decode and memory rows")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    ours, stock = build_pair(args.preset)
    rows = []

    def report(row):
        rows.append(row)
        print(f"{row[0]}: ours {row[1]:.1f}, stock {row[2]:.1f}", flush=True)

    precisions = [False]
    slowdown = bf16_slowdown()
    if args.bf16 == "on" or (args.bf16 == "auto" and slowdown < BF16_EMULATED):
        precisions.append(True)
    elif args.bf16 == "auto":
        print(f"bf16 autocast rows skipped: a bf16 GEMM runs {slowdown:.1f}x slower than fp32 here (emulated); "
              f"--bf16 on measures them (minutes per stock step)", flush=True)
    for bf16 in precisions:
        name = f"train tok/s seq {args.seq_len} {'bf16 autocast' if bf16 else 'fp32'}"
        s = train_tokens_per_s(stock, args.seq_len, args.steps, bf16, fused=False)
        o = train_tokens_per_s(ours, args.seq_len, args.steps, bf16, fused=True)
        report((name, o, s, o / s))
        if args.compile and not bf16:
            compiled_row(args, s, report)
    if not args.train_only:
        decode_and_memory_rows(args, report)
    print_table(args, rows)


def compiled_row(args, stock_tok_s: float, report) -> None:
    """Ours compiled against ours eager (same weights), their steps interleaved so that both see
    the same machine load; the first compiled step (the cold compile) is timed on its own."""
    eager, _ = build_pair(args.preset)
    compiled, _ = build_pair(args.preset)
    compile_model(compiled)
    steps = {"compiled": train_step_fn(compiled, args.seq_len, False, True),
             "eager": train_step_fn(eager, args.seq_len, False, True)}
    start = time.perf_counter()
    steps["compiled"]()
    cold = time.perf_counter() - start
    steps["eager"]()
    seconds = dict.fromkeys(steps, 0.0)
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name] += time.perf_counter() - start
    c, e = (args.steps * args.seq_len / seconds[k] for k in ("compiled", "eager"))
    report((f"train tok/s seq {args.seq_len} fp32 compiled", c, stock_tok_s, c / stock_tok_s))
    print(f"compiled / eager (ours, fp32, interleaved steps): {c:.1f} / {e:.1f} tok/s = {c / e:.2f}x; first "
          f"compiled step (cold compile) {cold:.1f} s", flush=True)
    if args.profile:
        print(f"one eager step:\n{top_operators(eager, args.seq_len)}\none compiled step:\n"
              f"{top_operators(compiled, args.seq_len)}", flush=True)


def decode_and_memory_rows(args, report) -> None:
    ours, stock = build_pair(args.preset)
    prompt = torch.randint(0, ours.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    hf = dict(do_sample=False, pad_token_id=0)
    speed = generate_tokens_per_s({
        "stock": lambda p, n: stock.eval().generate(p, max_new_tokens=n, min_new_tokens=n, **hf),
        "Decoder": Decoder(ours).generate,
        "HF generate": lambda p, n: ours.eval().generate(p, max_new_tokens=n, min_new_tokens=n, **hf),
    }, prompt, args.new_tokens, args.repeats)
    for name in ("Decoder", "HF generate"):
        report((f"greedy decode tok/s ({name})", speed[name], speed["stock"], speed[name] / speed["stock"]))
    for keep, what in ((1, "last logits"), (0, "all logits"))[: 2 if args.all_logits else 1]:
        mem = {w: forward_memory(w, args.preset, args.memory_len, 2048, keep) for w in ("ours", "stock")}
        label = f"fwd {args.memory_len} tok, window 2048, {what}:"
        report((f"{label} peak MB", mem["ours"]["extra_mb"], mem["stock"]["extra_mb"],
                mem["ours"]["extra_mb"] / mem["stock"]["extra_mb"]))
        report((f"{label} s", mem["ours"]["seconds"], mem["stock"]["seconds"],
                mem["ours"]["seconds"] / mem["stock"]["seconds"]))


def print_table(args, rows) -> None:
    print(f"\n{args.preset}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| {'measure':<46} | {'ours':>10} | {'stock':>10} | {'ours/stock':>10} |")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for name, o, s, r in rows:
        print(f"| {name:<46} | {o:>10.1f} | {s:>10.1f} | {r:>10.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(measure=n, ours=o, stock=s, ratio=r) for n, o, s, r in rows], f, indent=1)


if __name__ == "__main__":
    main()
