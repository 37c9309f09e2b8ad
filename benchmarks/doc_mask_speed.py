"""Document-masked packing: what the mask costs a training step.

Measures tokens/s of forward + backward (the trainer's call: fused LM-head loss, no logits; fp32
on CPU, bf16 on a GPU, where the mask is the FlexAttention block-mask path)
on rows of --seq-len tokens packed from about --documents documents each (random lengths, each
ended by an EOS token), with the document mask off and on (positions continuing along the row,
and restarting per document). The document ids and restarting positions are computed from the
EOS tokens inside each timed step, as the pre-training objective does. The cases' steps are
interleaved round by round, each case leading in turn, and the best round of each is kept: on a
shared machine a single timing says more about the neighbours than about the step.

    python benchmarks/doc_mask_speed.py [--presets doge-tiny doge-20m] [--seq-len 2048] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from doge import DogeConfig, DogeForCausalLM
from doge.model.rope import document_positions
from doge.training.pretrain import document_ids

EOS = 2
CASES = ("off", "on, positions continue", "on, positions restart")


def packed_rows(batch: int, seq_len: int, documents: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random tokens (never EOS) with an EOS ending each of about `documents` documents per row."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(EOS + 1, vocab, (batch, seq_len), generator=gen)
    for row in rows:
        ends = torch.randperm(seq_len - 1, generator=gen)[: documents - 1]
        row[ends] = EOS
    return rows


def step_fn(model, rows: torch.Tensor, case: str):
    """One forward + backward of `case` on `rows`."""
    def step():
        inputs = {}
        if case != "off":
            inputs["document_ids"] = document_ids(rows, EOS)
            if case.endswith("restart"):
                inputs["position_ids"] = document_positions(inputs["document_ids"])
        loss = model(input_ids=rows, labels=rows, skip_logits=True, use_cache=False, **inputs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """A GPU in bf16 (the trainer's precision there; the mask runs as FlexAttention), else the CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def timed(step) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_tokens_per_s(preset: str, args) -> dict:
    torch.manual_seed(0)
    device, dtype = device_and_dtype()
    model = DogeForCausalLM(DogeConfig.from_preset(preset)).to(device, dtype).train()
    rows = packed_rows(args.batch, args.seq_len, args.documents, model.config.vocab_size).to(device)
    steps = {case: step_fn(model, rows, case) for case in CASES}
    for step in steps.values():  # warm-up (on a GPU: FlexAttention's compile)
        step()
    best = dict.fromkeys(CASES, float("inf"))
    for round_ in range(args.rounds):
        for case in CASES[round_ % len(CASES):] + CASES[:round_ % len(CASES)]:  # each case leads in turn
            best[case] = min(best[case], timed(steps[case]))
    return {case: rows.numel() / seconds for case, seconds in best.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["doge-tiny", "doge-20m"], help="model presets")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    parser.add_argument("--batch", type=int, default=1, help="rows per step")
    parser.add_argument("--documents", type=int, default=8, help="documents per row")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best of each case is kept")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.batch} x {args.seq_len} tokens, "
          f"{args.documents} documents per row, {device_and_dtype()[1]} forward + backward on "
          f"{device_and_dtype()[0]}, best of {args.rounds} rounds", flush=True)
    print(f"| {'preset':<10} | {'document mask':<24} | {'tok/s':>8} | {'on/off':>6} |")
    print(f"|{'-' * 12}|{'-' * 26}|{'-' * 10}|{'-' * 8}|")
    for preset in args.presets:
        speed = best_tokens_per_s(preset, args)
        for case in CASES:
            print(f"| {preset:<10} | {case:<24} | {speed[case]:>8.0f} | {speed[case] / speed['off']:>6.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
