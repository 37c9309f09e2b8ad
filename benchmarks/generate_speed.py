"""Batch-1 CPU decode speed: our `Decoder` (fp32, fp16 and int8 weights; eager and compiled step)
next to stock `generate` on the same weights and next to the machine's memory roofline, for
doge-20m and doge-60m.

Batch-1 decoding reads every weight once per token, so the roofline is
    copy bandwidth (bytes read + written per second by a 256 MB tensor copy, with the same threads)
    / weight bytes one step reads (`Decoder.bytes_per_token`: each weight in the format it is
    stored in, the tied LM head once).
Timings are the best of `--repeats` interleaved rounds (prompt 32 + 128 new tokens, greedy), and
every round also times the copy, so the roofline is the best bandwidth seen over the same rounds:
on a shared machine a single timing says more about the neighbours than about the decoder, and
memory bandwidth moves with them too. Every
contender, stock included, runs with the same `--threads` (default: torch's, one per core; on a
busy 2-core machine `--threads 1` is steadier, since with 2 every op waits for the second thread
whenever another job holds a core). The compiled rows' compile time (once per batch size; the
cache's slot count is symbolic) is reported separately and is not in their tokens/s. Compiled greedy decoding with an
fp32 LM head runs `CHUNK_TOKENS` steps per compiled call; a low-bit LM head steps per token.
Agreement with fp32 is teacher-forced along the fp32 greedy path of `--prompts` prompts: top-1
agreement of each step's logits and the largest logit difference. Random weights give near-uniform
logits, where top-1 is a coin toss between near-equal logits; pass `--model EXPORT` to measure
agreement (and speed) on a trained model.

    python benchmarks/generate_speed.py [--presets doge-20m,doge-60m] [--repeats 5] [--threads N] [--model EXPORT]
                                         [--json OUT]
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
from model_speed import generate_tokens_per_s  # noqa: E402

from doge import DogeConfig, DogeForCausalLM  # noqa: E402
from doge.model.generation import Decoder  # noqa: E402
from doge.model.lowbit import WEIGHT_FORMATS  # noqa: E402

PROMPT, NEW = 32, 128


def copy_bandwidth(mbytes: int = 256, repeats: int = 2) -> float:
    """Bytes moved (read + written) per second by the best of `repeats` copies of a large tensor
    (after an untimed one: a fresh destination's first writes are page faults, not bandwidth)."""
    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.empty_like(src).copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def load(preset: str, export: str | None):
    """Ours and the stock model with identical weights (an export's, or seeded random ones)."""
    torch.manual_seed(0)
    ours = DogeForCausalLM.from_pretrained(export, dtype=torch.float32) if export else \
        DogeForCausalLM(DogeConfig.from_preset(preset))
    stock = transformers.DogeForCausalLM(transformers.DogeConfig(**ours.config.to_dict()))
    stock.load_state_dict(ours.state_dict())
    return ours.eval(), stock.eval()


def agreement(decoders: dict, prompts: torch.Tensor) -> dict:
    """Per reduced format (eager step): top-1 agreement and max |logit difference| with fp32,
    teacher-forced. (The compiled step is checked against the eager one by the tests.)"""
    path = torch.cat([decoders["fp32"].generate(p[None], NEW) for p in prompts])
    reference = decoders["fp32"].forced_logits(path, PROMPT)
    out = {}
    for fmt in WEIGHT_FORMATS:
        decoder = decoders[fmt]
        if fmt != "fp32":
            logits = decoder.forced_logits(path, PROMPT)
            out[fmt] = dict(top1=float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                            max_logit_diff=float((logits - reference).abs().max()))
    return out


def bench(preset: str, export: str | None, repeats: int, n_prompts: int) -> dict:
    ours, stock = load(preset, export)
    vocab = ours.config.vocab_size
    prompts = torch.randint(0, vocab, (n_prompts, PROMPT), generator=torch.Generator().manual_seed(2))
    decoders = {fmt + suffix: Decoder(ours, static=False, weights=fmt, compile=bool(suffix))
                for suffix in ("", " compiled") for fmt in WEIGHT_FORMATS}
    contenders = {"stock generate": lambda p, n: stock.generate(p, max_new_tokens=n, min_new_tokens=n,
                                                                do_sample=False, pad_token_id=0)}
    contenders.update({name: decoder.generate for name, decoder in decoders.items()})
    copies = []  # one per round, timed before the contenders
    tokens_per_s = generate_tokens_per_s(contenders, prompts[:1], NEW, repeats,
                                         before_round=lambda: copies.append(copy_bandwidth()))
    bandwidth = max(copies)
    return dict(copy_bandwidth=bandwidth, preset=export or preset, tokens_per_s=tokens_per_s,
                weight_mb={name: d.bytes_per_token() / 1e6 for name, d in decoders.items()},
                roofline={name: bandwidth / d.bytes_per_token() for name, d in decoders.items()},
                compile_s={name: d.compile_seconds for name, d in decoders.items()},
                agreement=agreement(decoders, prompts))


def report(result: dict) -> None:
    speed, stock = result["tokens_per_s"], result["tokens_per_s"]["stock generate"]
    print(f"\n{result['preset']} (copy {result['copy_bandwidth'] / 1e9:.1f} GB/s, read + write): | contender "
          f"| tokens/s | x stock | weight MB/token | roofline tok/s | of roofline | compile s |")
    print(f"| stock generate (fp32) | {stock:.1f} | 1.00 | {result['weight_mb']['fp32']:.1f} | | | |")
    for name, roof in result["roofline"].items():
        s = speed[name]
        print(f"| Decoder {name} | {s:.1f} | {s / stock:.2f} | {result['weight_mb'][name]:.1f} | {roof:.0f} | "
              f"{100 * s / roof:.0f}% | {result['compile_s'][name]:.1f} |")
    for fmt, a in result["agreement"].items():
        print(f"{fmt} vs fp32: top-1 agreement {100 * a['top1']:.1f}%, max |logit diff| {a['max_logit_diff']:.3g}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="doge-20m,doge-60m", help="comma-separated presets")
    parser.add_argument("--model", help="an export to measure instead of the presets' random weights")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds, best kept")
    parser.add_argument("--prompts", type=int, default=4, help="prompts for the agreement check")
    parser.add_argument("--threads", type=int, help="torch threads for every contender (default: torch's)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = [bench(preset, args.model, args.repeats, args.prompts)
               for preset in ([args.model] if args.model else args.presets.split(","))]
    for result in results:
        report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=torch.get_num_threads(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
