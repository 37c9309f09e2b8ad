"""Batch-1 CPU decode speed: our `Decoder` (fp32, fp16 and int8 weights) next to stock `generate`
on the same weights and next to the machine's memory roofline, for doge-20m and doge-60m.

Batch-1 decoding reads every weight once per token, so the roofline is
    copy bandwidth (bytes read + written per second by a 256 MB tensor copy, measured in this run)
    / weight bytes read per token (each format's bytes: linears and the tied LM head, norms etc.).
Timings are the best of `--repeats` interleaved rounds (prompt 32 + 128 new tokens, greedy): on a
shared machine a single timing says more about the neighbours than about the decoder.
Agreement with fp32 is teacher-forced along the fp32 greedy path of `--prompts` prompts: top-1
agreement of each step's logits and the largest logit difference. Random weights give near-uniform
logits, where top-1 is a coin toss between near-equal logits; pass `--model EXPORT` to measure
agreement (and speed) on a trained model.

    python benchmarks/generate_speed.py [--presets doge-20m,doge-60m] [--repeats 5] [--model EXPORT] [--json OUT]
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
BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def copy_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes moved (read + written) per second by the best of `repeats` copies of a large tensor."""
    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def weight_bytes(model: DogeForCausalLM, fmt: str) -> int:
    """Bytes one decode step reads: the linears in `fmt` (+ a float per row for int8 scales), the
    rest in float32; the input embedding (one row per token) is not counted."""
    total = 0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        packed = p.dim() == 2 and "dt_proj" not in name
        total += p.numel() * (BYTES[fmt] if packed else 4) + (p.shape[0] * 4 if packed and fmt == "int8" else 0)
    return total


def load(preset: str, export: str | None):
    """Ours and the stock model with identical weights (an export's, or seeded random ones)."""
    torch.manual_seed(0)
    ours = DogeForCausalLM.from_pretrained(export, dtype=torch.float32) if export else \
        DogeForCausalLM(DogeConfig.from_preset(preset))
    stock = transformers.DogeForCausalLM(transformers.DogeConfig(**ours.config.to_dict()))
    stock.load_state_dict(ours.state_dict())
    return ours.eval(), stock.eval()


def agreement(decoders: dict, prompts: torch.Tensor) -> dict:
    """Per reduced format: top-1 agreement and max |logit difference| with fp32, teacher-forced."""
    path = torch.cat([decoders["fp32"].generate(p[None], NEW) for p in prompts])
    reference = decoders["fp32"].forced_logits(path, PROMPT)
    out = {}
    for fmt, decoder in decoders.items():
        if fmt != "fp32":
            logits = decoder.forced_logits(path, PROMPT)
            out[fmt] = dict(top1=float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                            max_logit_diff=float((logits - reference).abs().max()))
    return out


def bench(preset: str, export: str | None, repeats: int, n_prompts: int, bandwidth: float) -> dict:
    ours, stock = load(preset, export)
    vocab = ours.config.vocab_size
    prompts = torch.randint(0, vocab, (n_prompts, PROMPT), generator=torch.Generator().manual_seed(2))
    decoders = {fmt: Decoder(ours, static=False, weights=fmt) for fmt in WEIGHT_FORMATS}
    contenders = {"stock generate": lambda p, n: stock.generate(p, max_new_tokens=n, min_new_tokens=n,
                                                                do_sample=False, pad_token_id=0)}
    contenders.update({f"Decoder {fmt}": decoder.generate for fmt, decoder in decoders.items()})
    tokens_per_s = generate_tokens_per_s(contenders, prompts[:1], NEW, repeats)
    roofline = {fmt: bandwidth / weight_bytes(ours, fmt) for fmt in WEIGHT_FORMATS}
    return dict(preset=export or preset, tokens_per_s=tokens_per_s, roofline=roofline,
                weight_mb={fmt: weight_bytes(ours, fmt) / 1e6 for fmt in WEIGHT_FORMATS},
                agreement=agreement(decoders, prompts))


def report(result: dict) -> None:
    speed, stock = result["tokens_per_s"], result["tokens_per_s"]["stock generate"]
    print(f"\n{result['preset']}: | contender | tokens/s | x stock | weight MB/token | roofline tok/s | of roofline |")
    print(f"| stock generate (fp32) | {stock:.1f} | 1.00 | {result['weight_mb']['fp32']:.1f} | | |")
    for fmt in WEIGHT_FORMATS:
        s, roof = speed[f"Decoder {fmt}"], result["roofline"][fmt]
        print(f"| Decoder {fmt} | {s:.1f} | {s / stock:.2f} | {result['weight_mb'][fmt]:.1f} | {roof:.0f} | "
              f"{100 * s / roof:.0f}% |")
    for fmt, a in result["agreement"].items():
        print(f"{fmt} vs fp32: top-1 agreement {100 * a['top1']:.1f}%, max |logit diff| {a['max_logit_diff']:.3g}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="doge-20m,doge-60m", help="comma-separated presets")
    parser.add_argument("--model", help="an export to measure instead of the presets' random weights")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds, best kept")
    parser.add_argument("--prompts", type=int, default=4, help="prompts for the agreement check")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(read + write)", flush=True)
    results = [bench(preset, args.model, args.repeats, args.prompts, bandwidth)
               for preset in ([args.model] if args.model else args.presets.split(","))]
    for result in results:
        report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_bandwidth=bandwidth, threads=torch.get_num_threads(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
