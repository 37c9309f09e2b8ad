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

Bad input is one `error: ...` line (exit 2) naming the flag or file and the fix, checked before
the model loads: an empty prompt, --max-new-tokens < 1, a --temperature that is negative or not
finite, --threads < 1, --chat with a tokenizer that has no chat template, a missing export folder
or one without config.json, weights or tokenizer, a prompt of at least max_position_embeddings
tokens. When prompt + --max-new-tokens would pass max_position_embeddings, the new tokens are
cut to fit, with a note.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from doge.command import OneLineParser, check_export, one_line
from doge.data.errors import DataError


def has_chat_template(folder: str) -> bool:
    """Whether the export's tokenizer files carry a chat template (where transformers looks for one)."""
    path = Path(folder)
    if any((path / name).exists() for name in ("chat_template.jinja", "chat_template.json",
                                                "additional_chat_templates")):
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def no_chat_template(folder: str) -> DataError:
    return DataError(f"--chat: the tokenizer of {folder} has no chat template; leave out --chat to continue the "
                     "prompt as plain text, or use an SFT/DPO export (their tokenizers carry the template)")


def parse_args(argv=None):
    p = OneLineParser(prog="python -m doge.generate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="EXPORT", help="HF export folder (model + tokenizer)")
    p.add_argument("--prompt", required=True, help="text to continue, or the user message with --chat")
    p.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="at most this many new tokens (default 128; cut to fit max_position_embeddings)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--weights", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="decode weight format (fp16/int8: CPU fbgemm kernels, float32 accumulation/output)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (tens of seconds once; falls back to eager)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is faster on a busy machine)")
    return p.parse_args(argv)


def check_flags(args) -> None:
    """The flags' values, before anything loads."""
    if not args.prompt.strip():
        raise DataError("--prompt is empty; give the text to continue (or, with --chat, the user's message)")
    if args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens {args.max_new_tokens}: give a number of at least 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise DataError(f"--temperature {args.temperature}: give 0 for greedy decoding or a finite number > 0 "
                        "to sample (1.0 samples the model's distribution)")
    if args.threads is not None and args.threads < 1:
        raise DataError(f"--threads {args.threads}: give a number of at least 1 (or leave it out for torch's default)")
    if not -(2 ** 63) <= args.seed < 2 ** 64:
        raise DataError(f"--seed {args.seed}: give a number from 0 to 2**64 - 1")


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return tok(prompt)["input_ids"]
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def stop_id(tok, chat: bool) -> int | None:
    """The end-of-turn token in chat mode (when the tokenizer has one), else EOS."""
    end = tok.convert_tokens_to_ids("<|im_end|>") if chat else None
    return end if isinstance(end, int) and end != tok.unk_token_id else tok.eos_token_id


def fit_new_tokens(prompt_len: int, max_new: int, positions: int) -> int:
    """New tokens that fit `positions` after a prompt of `prompt_len` tokens; DataError if none do."""
    if prompt_len >= positions:
        raise DataError(f"--prompt: {prompt_len} tokens, but the model has {positions} positions "
                        f"(max_position_embeddings) for the prompt and the new tokens; shorten the prompt to at "
                        f"most {positions - 1} tokens")
    return min(max_new, positions - prompt_len)


def load(args):
    """(tokenizer, prompt ids, new tokens, model): everything checked before the weights load."""
    import torch
    from transformers import AutoTokenizer

    from doge import DogeConfig, DogeForCausalLM

    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        config = DogeConfig.from_pretrained(args.model)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"--model {args.model}: cannot load the tokenizer or config ({one_line(err)}); "
                        "export the checkpoint again") from None
    if args.chat and not tok.chat_template:
        raise no_chat_template(args.model)
    try:
        ids = prompt_ids(tok, args.prompt, args.chat)
    except Exception as err:  # a chat template that fails to render (jinja2's errors)
        if not args.chat:
            raise
        raise DataError(f"--chat: the chat template of {args.model} fails on this prompt ({one_line(err)}); "
                        "fix the template (chat_template.jinja) or leave out --chat") from None
    if not ids:
        raise DataError("--prompt: no tokens after tokenizing; give some text")
    positions = config.max_position_embeddings
    new = fit_new_tokens(len(ids), args.max_new_tokens, positions)
    if new < args.max_new_tokens:
        print(f"note: --max-new-tokens {args.max_new_tokens} cut to {new}: the prompt's {len(ids)} tokens + "
              f"{new} new fill the model's {positions} positions (max_position_embeddings)", file=sys.stderr)
    try:
        model = DogeForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    except Exception as err:  # a truncated or foreign weights file: safetensors, torch and transformers errors
        raise DataError(f"--model {args.model}: cannot load the weights ({one_line(err)}); "
                        "export the checkpoint again") from None
    return tok, torch.tensor([ids]), new, model


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_flags(args)
        check_export(args.model)
        if args.chat and not has_chat_template(args.model):
            raise no_chat_template(args.model)
        tok, ids, max_new, model = load(args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    from doge.model.generation import Decoder

    if args.threads:
        torch.set_num_threads(args.threads)
    stop = stop_id(tok, args.chat)
    generator = torch.Generator().manual_seed(args.seed)
    decoder = Decoder(model, static=False, weights=args.weights, compile=args.compile)
    start, new = time.perf_counter(), []
    for token in decoder.stream(ids, max_new, args.temperature, stop, generator):
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
