"""Training throughput on a GPU, one command: the real trainer against the plain loop, stock
transformers and a nanoGPT-style GPT of the same size, in one run.

For each case (doge-20m and doge-160m at seq 2048, doge-160m at 8192 with keep window 2048):
- `trainer`: `deepspeed --num_gpus 1 doge/train.py` (ZeRO-2, bf16, `--compile on`) on prepared data
  (a tokenizer and shards built here from the corpora found, see `corpus_files`); tokens/s and MFU
  of its log lines after the first two (the trainer's own figures, with the peak below), peak
  memory, and for "first step" the seconds from launch to step 1 (start-up and compile);
- `plain loop`: our model, bf16 autocast, torch's fused AdamW, its decoder layers and LM-head
  loss compiled as the trainer compiles them; no DeepSpeed, no data loading;
- `stock`: `transformers.DogeForCausalLM`, same config and loop, eager (its DMA does not compile);
- `nanoGPT`: a GPT of the same width, depth and vocabulary (causal SDPA, GELU MLP of 4x width,
  tied head), the whole model compiled: what the hardware gives a plain transformer.
MFU = tokens/s x FLOPs per token (`doge.training.flops`, the trainer's definition; the GPT's by the
same rule) / peak, where peak is a bf16 GEMM timed at the start of this run. Then the top
kernels of one compiled plain-loop step of each case, and the LM-head loss (forward + backward
of a case's micro-batch) as ours (`doge.model.loss`, compiled) against Liger Kernel's fused linear
cross-entropy where `liger-kernel` is installed.

    python benchmarks/gpu_train.py [--cases 20m,160m,160m-8k] [--steps 10] [--json OUT]
    python benchmarks/gpu_train.py --smoke      # the same code on CPU, doge-tiny, well under a minute

Corpora: ../shared/data/pretrain (or --corpus FILES, or .gpu-data/pretrain when carried to a GPU
machine); without any, Python's own documentation and sources (said when used).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from doge.model.configuration import DogeConfig  # noqa: E402
from doge.model.modeling import DogeForCausalLM  # noqa: E402
from doge.training.compile import compile_model  # noqa: E402
from doge.training.flops import flops_per_token  # noqa: E402


@dataclass
class Case:
    name: str
    preset: str
    seq_len: int
    keep_window: int
    micro: int  # rows per forward/backward
    overrides: dict


CASES = {
    "20m": Case("doge-20m seq 2048", "doge-20m", 2048, 2048, 32, {}),
    "160m": Case("doge-160m seq 2048", "doge-160m", 2048, 2048, 16, {}),
    "160m-8k": Case("doge-160m seq 8192, window 2048", "doge-160m", 8192, 2048, 4, {"max_position_embeddings": 8192}),
}
SMOKE = {"tiny": Case("doge-tiny seq 128, window 64", "doge-tiny", 128, 64, 2, {})}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gemm_peak(n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matmul on this device: the MFU peak of this run."""
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def doge_config(case: Case) -> DogeConfig:
    return DogeConfig.from_preset(case.preset, keep_window_size=case.keep_window, **case.overrides)


class GPT(nn.Module):
    """nanoGPT's model in brief: pre-norm blocks, fused causal attention, 4x GELU MLP, tied head."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(seq_len, hidden)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(hidden), qkv=nn.Linear(hidden, 3 * hidden), proj=nn.Linear(hidden, hidden),
            ln2=nn.LayerNorm(hidden), fc=nn.Linear(hidden, 4 * hidden), out=nn.Linear(4 * hidden, hidden)))
            for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        x = self.wte(ids) + self.wpe(torch.arange(length, device=ids.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["ln1"](x)).view(batch, length, 3, self.heads, -1).transpose(1, 3).unbind(2)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, -1)
            x = x + b["proj"](attn)
            x = x + b["out"](F.gelu(b["fc"](b["ln2"](x))))
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def gpt_flops_per_token(config: DogeConfig, seq_len: int) -> float:
    """The trainer's rule for the GPT: 6 x matmul weights per token + 12 x layers x hidden x keys."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    weights = layers * 12 * hidden * hidden + hidden * config.vocab_size
    return 6 * weights + 12 * layers * hidden * (seq_len + 1) / 2


def timed_loop(model, loss_fn, case: Case, steps: int, peak: float, flops: float) -> dict:
    """Optimizer steps on random rows (bf16 autocast on GPUs): tokens/s, MFU, peak memory, first step."""
    dev = device()
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (case.micro, case.seq_len), generator=gen).to(dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = loss_fn(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    tok_s = steps * case.micro * case.seq_len / (time.perf_counter() - start)
    return {"tokens_per_s": tok_s, "mfu": tok_s * flops / peak, "peak_gb": peak_memory_gb(), "first_step_s": first}


def peak_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def doge_loss(model, ids):
    return model(input_ids=ids, labels=ids, skip_logits=True, use_cache=False).loss


def stock_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def plain_loop(case: Case, steps: int, peak: float) -> dict:
    torch.manual_seed(0)
    model = DogeForCausalLM(doge_config(case))
    compile_model(model)
    return timed_loop(model, doge_loss, case, steps, peak, flops_per_token(model.config, case.seq_len))


def stock_loop(case: Case, steps: int, peak: float) -> dict:
    import transformers

    config = doge_config(case)
    model = transformers.DogeForCausalLM(transformers.DogeConfig(**config.to_dict()))
    return timed_loop(model, stock_loss, case, steps, peak, flops_per_token(config, case.seq_len))


def gpt_loop(case: Case, steps: int, peak: float) -> dict:
    config = doge_config(case)
    model = GPT(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                case.seq_len)
    compiled = torch.compile(model)
    return timed_loop(compiled, lambda m, ids: m(ids), case, steps, peak, gpt_flops_per_token(config, case.seq_len))


def top_kernels(case: Case, count: int = 8) -> list[tuple[str, float]]:
    """(kernel, ms) of one compiled plain-loop step, longest first (CPU operators without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = DogeForCausalLM(doge_config(case)).to(device()).train()
    compile_model(model)
    ids = torch.randint(0, 1000, (case.micro, case.seq_len), device=device())
    cuda = torch.cuda.is_available()

    def step():
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=cuda):
            doge_loss(model, ids).backward()
    step()
    sync()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:count]
    return [(e.key[:60], getattr(e, key) / 1e3) for e in rows]


def head_loss_ms(case: Case, repeats: int = 5) -> dict:
    """Milliseconds of the LM-head loss, forward and backward, over one micro-batch of hidden states."""
    from doge.model.loss import fused_causal_lm_loss

    config = doge_config(case)
    dev, dtype = device(), torch.bfloat16 if torch.cuda.is_available() else torch.float32
    hidden = torch.randn(case.micro * case.seq_len, config.hidden_size, device=dev, dtype=dtype, requires_grad=True)
    weight = torch.randn(config.vocab_size, config.hidden_size, device=dev, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, config.vocab_size, (case.micro * case.seq_len,), device=dev)
    contenders = {"ours": torch.compile(lambda h, w, y: fused_causal_lm_loss(h, w, y))}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        contenders["liger"] = lambda h, w, y: liger(w, h[:-1], y[1:])  # shifted as ours shifts
    except ImportError:
        print("liger-kernel not installed: the LM-head loss is measured for ours only", flush=True)
    out = {}
    for name, fn in contenders.items():
        fn(hidden, weight, labels).backward()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn(hidden, weight, labels).backward()
        sync()
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def corpus_files(args, work: Path) -> list[str]:
    """--corpus, else the carried or neighbouring pretrain corpora, else Python's documentation."""
    if args.corpus:
        return args.corpus
    for folder in (REPO / ".gpu-data" / "pretrain", REPO.parent / "shared" / "data" / "pretrain"):
        if folder.is_dir():
            return [str(p) for p in sorted(folder.glob("*.txt"))]
    from doge.demo import build_corpus

    print("no corpus found: using Python's own documentation and sources", flush=True)
    return build_corpus(work / "corpus", shared=work / "absent")


def prepare_data(args, work: Path, vocab: int, seq_len: int) -> Path:
    """Tokenizer and shards with the repository's data tools (rows of the longest case's length)."""
    data, tok = work / "data", work / "tokenizer"
    files = corpus_files(args, work)
    start = time.perf_counter()
    run([sys.executable, "data_tools/train_tokenizer.py", "--input", *files, "--vocab-size", str(vocab),
         "--output", str(tok)])
    run([sys.executable, "data_tools/prepare.py", "--input", *files, "--tokenizer", str(tok), "--seq-len",
         str(seq_len), "--output", str(data), "--val-fraction", "0", "--workers", str(min(8, os.cpu_count()))])
    print(f"tokenizer + shards: {time.perf_counter() - start:.0f} s", flush=True)
    return data


def run(cmd: list[str], env: dict | None = None) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(cmd[:3])} ... exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                 f"{done.stderr[-3000:]}")


def trainer(case: Case, data: Path, work: Path, steps: int, peak: float, smoke: bool) -> dict:
    """The real trainer on one device; its own tokens/s and MFU over the steps after the first two."""
    rundir = work / f"run-{case.preset}-{case.seq_len}"
    recipe = work / f"{case.preset}-{case.seq_len}.yaml"
    recipe.write_text(f"model: {case.preset}\nmodel_overrides: "
                      f"{json.dumps({'keep_window_size': case.keep_window, **case.overrides})}\n")
    args = ["doge/train.py", "--deepspeed", "ds_configs/zero2.json", "--recipe", str(recipe), "--data", str(data),
            "--output", str(rundir), "--seq-len", str(case.seq_len), "--micro-batch-size", str(case.micro),
            "--global-batch-tokens", str(4 * case.micro * case.seq_len), "--max-steps", str(steps + 2),
            "--warmup-steps", "1", "--decay-steps", "1", "--log-interval", "1", "--eval-interval", "0",
            "--save-interval", "0", "--export", "false", "--wandb", "off", "--compile", "on",
            "--precision", "fp32" if smoke else "bf16", "--resume", "never"]
    env = dict(os.environ, DOGE_PEAK_FLOPS=str(peak), PYTHONPATH=str(REPO))
    if smoke:
        env["DS_ACCELERATOR"] = "cpu"
    launcher = [sys.executable] if smoke else ["deepspeed", "--num_gpus", "1"]
    start = time.time()
    run([*launcher, *args], env)
    wall = time.time() - start
    lines = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in lines if "tokens_per_s" in r]
    steady = lines[2:]
    tok_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    return {"tokens_per_s": tok_s, "mfu": sum(r["mfu"] for r in steady) / len(steady),
            "peak_gb": max((r.get("peak_memory_gb") or 0) for r in lines) or None,
            "first_step_s": lines[0]["time"] - start, "wall_s": wall}  # launch to step 1: start-up + compile


def table(results: dict, peak: float) -> str:
    out = [f"peak (bf16 GEMM, this run): {peak / 1e12:.1f} TFLOP/s", "",
           "| case | contender | tokens/s | MFU | peak GB | first step s |", "|---|---|---|---|---|---|"]
    for case, rows in results.items():
        for who, r in rows.items():
            gb = f"{r['peak_gb']:.1f}" if r.get("peak_gb") else "-"
            out.append(f"| {case} | {who} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {gb} | "
                       f"{r['first_step_s']:.1f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contender (default 10)")
    parser.add_argument("--corpus", nargs="+", help="text files for the trainer's data (default: see above)")
    parser.add_argument("--work", default="/tmp/doge-gpu-train", help="scratch folder (data, runs)")
    parser.add_argument("--smoke", action="store_true", help="CPU, doge-tiny, 2 steps: checks the code, not the speed")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device: this benchmark measures GPUs; --smoke runs its code on CPU")
    cases = SMOKE if args.smoke else {k: CASES[k] for k in args.cases.split(",")}
    steps = 2 if args.smoke else args.steps
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    peak = gemm_peak(256 if args.smoke else 8192)
    data = prepare_data(args, work, 1024 if args.smoke else 32768, max(c.seq_len for c in cases.values()))
    results, kernels, heads = {}, {}, {}
    for case in cases.values():
        results[case.name] = {"trainer": trainer(case, data, work, steps, peak, args.smoke)}
        for who, loop in (("plain loop", plain_loop), ("stock", stock_loop), ("nanoGPT", gpt_loop)):
            results[case.name][who] = loop(case, steps, peak)
            print(f"{case.name} {who}: {results[case.name][who]['tokens_per_s']:,.0f} tok/s", flush=True)
        kernels[case.name] = top_kernels(case)
        heads[case.name] = head_loss_ms(case)
    print(table(results, peak))
    for name, rows in kernels.items():
        print(f"\ntop kernels, one compiled plain-loop step, {name}:")
        for kernel, ms in rows:
            print(f"  {ms:8.2f} ms  {kernel}")
        print("LM-head loss, forward + backward: " + ", ".join(f"{k} {v:.2f} ms" for k, v in heads[name].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "results": results, "kernels": kernels,
                                               "head_loss_ms": heads}, indent=1))


if __name__ == "__main__":
    main()
