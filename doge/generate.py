"""Generate text with an export: `python -m doge.generate --model EXPORT --prompt "..." [--chat]`.

Tokens are printed as they are decoded (the KV-cache `Decoder`, batch 1, greedy unless
--temperature > 0); the last line gives the prompt length, new tokens and decode tokens/s.
--chat wraps the prompt as a user turn with the tokenizer's chat template and stops at the
end-of-turn token (`<|im_end|>`), as the SFT/DPO exports were trained to answer.
--weights fp16 or int8 decodes with the linear weights and LM head in fewer bytes (faster on a
CPU, where decoding reads every weight per token; agreement with fp32 in the README).
--compile runs each decode step as one torch.compile'd graph (several times fewer op calls per
token; greedy decoding with an fp32 LM head runs several steps per compiled call, so tokens print
in short bursts): it pays off for long outputs or repeated runs (inductor caches compiled code on
disk); the time spent compiling is printed on the last line and is not in its tokens/s.
"""
from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="EXPORT", help="HF export folder (model + tokenizer)")
    p.add_argument("--prompt", required=True, help="text to continue, or the user message with --chat")
    p.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--weights", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="decode weight format (fp16/int8: CPU fbgemm kernels, float32 accumulation/output)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (tens of seconds once; falls back to eager)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is faster on a busy machine)")
    return p.parse_args(argv)


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tok(prompt)["input_ids"]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def stop_id(tok, chat: bool) -> int | None:
    """The end-of-turn token in chat mode (when the tokenizer has one), else EOS."""
    end = tok.convert_tokens_to_ids("<|im_end|>") if chat else None
    return end if isinstance(end, int) and end != tok.unk_token_id else tok.eos_token_id


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from doge import DogeForCausalLM
    from doge.model.generation import Decoder

    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = DogeForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    except (OSError, ValueError) as err:
        print(f"error: --model {args.model}: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.tensor([prompt_ids(tok, args.prompt, args.chat)])
    stop = stop_id(tok, args.chat)
    generator = torch.Generator().manual_seed(args.seed)
    decoder = Decoder(model, static=False, weights=args.weights, compile=args.compile)
    start, new = time.perf_counter(), []
    for token in decoder.stream(ids, args.max_new_tokens, args.temperature, stop, generator):
        if int(token) == stop:
            break
        new.append(int(token))
        print(tok.decode(new[-1:]), end="", flush=True)  # per token: byte-fallback pieces may print late
    seconds = time.perf_counter() - start - decoder.compile_seconds
    compiled = f", compiled in {decoder.compile_seconds:.1f} s (not counted)" if args.compile else ""
    print(f"\n[{ids.shape[1]} prompt + {len(new)} new tokens, {len(new) / seconds:.1f} tokens/s{compiled}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
