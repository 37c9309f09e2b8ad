"""One-shot GPU check of the model (run on a lent CUDA machine; CI never runs it).

What only a GPU shows: parity with stock on CUDA (fp32 and bf16), which SDPA kernel our folded
DMA fast path gets, training tokens/s and MFU (bf16 autocast) ours vs stock, the 8k sparse-path
peak memory, and decode tokens/s. Prints a table; `--json OUT` also writes the results. MFU uses
the trainer's definition (doge/training/flops.py): datasheet bf16 peak, or DOGE_PEAK_FLOPS (e.g. a
measured GEMM rate).

    python benchmarks/gpu_check.py --json $OUT/gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import build_pair  # noqa: E402

from doge.model.generation import Decoder  # noqa: E402
from doge.training.flops import device_peak_flops, flops_per_token  # noqa: E402


def parity(dev):
    ours, stock = build_pair("doge-tiny", seed=3, vocab_size=4096)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    stock.load_state_dict(ours.state_dict())
    ours, stock = ours.to(dev).eval(), stock.to(dev).eval()
    x = torch.stack([torch.randperm(4096, device=dev)[:512] for _ in range(2)])
    out = {}
    for attn in ("eager", "sdpa"):
        stock.config._attn_implementation = attn
        for dtype in (torch.float32, torch.bfloat16):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                diff = (ours(x).logits.float() - stock(x).logits.float()).abs().max().item()
            out[f"max |logit diff| vs stock {attn} {str(dtype)[6:]}"] = diff
    return out


def sdpa_kernels(dev):
    ours, _ = build_pair("doge-20m")
    ours = ours.to(dev).train()
    x = torch.randint(0, 32768, (2, 2048), device=dev)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ours(x, labels=x, skip_logits=True).loss.backward()
        torch.cuda.synchronize()
    kernels = ("flash", "fmha", "attention", "efficient")
    names = {e.key for e in prof.key_averages() if any(k in e.key.lower() for k in kernels)}
    return sorted(names)[:6]


def train_speed(model, dev, batch, seq_len, steps, fused):
    model = model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=dev)
    extra = {"skip_logits": True} if fused else {}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, **extra).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    tps = steps * batch * seq_len / (time.perf_counter() - start)
    mem = torch.cuda.max_memory_allocated() / 2**30
    model.cpu()
    return tps, mem


def memory_8k(model, dev):
    model = model.to(dev).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 8192), device=dev)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    torch.cuda.synchronize()
    model.cpu()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def decode_speed(ours, stock, dev):
    """Greedy fp32, prompt 32 + 128 new tokens, batch 1: tokens/s, and whether each contender's
    tokens equal stock generate's with eager attention (stock's default sdpa backend, timed here,
    computes wrong logits on CUDA in transformers 5.17, see parity())."""
    ours, stock = ours.to(dev).eval(), stock.to(dev).eval()
    prompt = torch.randint(0, 32768, (1, 32), device=dev)
    contenders = {
        "stock generate": lambda n: stock.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                   pad_token_id=0),
        "ours Decoder eager": lambda n: Decoder(ours, static=False).generate(prompt, n),
        "ours Decoder static + CUDA graph": lambda n: Decoder(ours).generate(prompt, n),
    }
    res, tokens = {}, {}
    for name, fn in contenders.items():
        with torch.no_grad():
            fn(8)
            torch.cuda.synchronize()
            t = time.perf_counter()
            tokens[name] = fn(128)
            torch.cuda.synchronize()
        res[name] = 128 / (time.perf_counter() - t)
    stock.config._attn_implementation = "eager"
    with torch.no_grad():
        reference = contenders["stock generate"](128)
    for name in contenders:
        res[f"{name}: same tokens as stock eager"] = bool(torch.equal(tokens[name], reference))
    ours.cpu(), stock.cpu()
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--decode-only", action="store_true", help="only the decode rows (doge-20m and doge-160m)")
    args = parser.parse_args()
    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__}
    if args.decode_only:
        for preset in ("doge-20m", "doge-160m"):
            results[f"decode tok/s {preset}"] = decode_speed(*build_pair(preset), dev)
            print(preset, results[f"decode tok/s {preset}"], flush=True)
        return write(results, args.json)
    results["parity"] = parity(dev)
    results["sdpa_kernels"] = sdpa_kernels(dev)
    print(results, flush=True)
    for preset, batch in (("doge-20m", 16), ("doge-160m", 8)):
        ours, stock = build_pair(preset)
        row = {}
        for name, model, fused in (("ours", ours, True), ("stock", stock, False)):
            tps, mem = train_speed(model, dev, batch, 2048, args.steps, fused)
            mfu = tps * flops_per_token(model.config, 2048) / device_peak_flops(bf16=True)
            row[name] = dict(tokens_per_s=tps, mfu=mfu, peak_gib=mem)
        results[f"train {preset} bf16 b{batch}x2048"] = row
        print(preset, row, flush=True)
    ours, stock = build_pair("doge-20m", keep_window_size=2048)
    results["forward 8192 tok window 2048 extra MiB"] = {"ours": memory_8k(ours, dev), "stock": memory_8k(stock, dev)}
    results["decode tok/s doge-20m"] = decode_speed(ours, stock, dev)
    write(results, args.json)


def write(results: dict, path: str | None) -> None:
    print(json.dumps(results, indent=1))
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
