#!/usr/bin/env python
"""Render chat (SFT) or preference (DPO) data with the tokenizer's chat template into a chat DATADIR.

Examples:
  python data_tools/prepare_chat.py --kind sft --input oasst.jsonl --tokenizer TOKDIR --seq-len 2048 --output data/sft
  python data_tools/prepare_chat.py --kind sft --input gsm8k_train.jsonl --fields question,answer ...
  python data_tools/prepare_chat.py --kind dpo --input hh_helpful_base_test.jsonl.gz ... --output data/dpo

SFT records: `messages` lists of {role, content} (smoltalk, OpenAssistant), or two string fields
given by --fields PROMPT,ANSWER. DPO records: ultrafeedback_binarized (`chosen`/`rejected` message
lists), `prompt`/`chosen`/`rejected` strings, or HH-RLHF transcripts. Inputs are JSON Lines
(optionally .gz), parquet, or hf:NAME[:CONFIG[:SPLIT]]. The loss mask covers the assistant turns
and their end-of-turn token; one conversation per row (no packing), padded to --seq-len; longer
ones are truncated (dropped if no assistant token is left). Records the chat template rejects,
records whose contents hold special-token strings, and DPO pairs whose chosen and rejected answers
are identical or empty (no DPO gradient) are skipped. The counts are printed per source (with a
warning when most records were dropped or truncated) and kept in manifest.json with a few
`FILE line N` samples of each skip. Bad options or records: one `error: ...` line, exit 2, and
nothing written.
"""
import argparse
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad or missing flag: one `error: ...` line and exit 2 (not argparse's usage block)."""
        print(f"error: {message}; see python data_tools/prepare_chat.py --help", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("sft", "dpo"), required=True, help="chat conversations or preference pairs")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC", help="JSONL/parquet files, folders, globs "
                                                                            "or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--tokenizer", required=True, metavar="TOKDIR", help="tokenizer folder with a chat template")
    p.add_argument("--output", required=True, metavar="DATADIR", help="folder to create")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--fields", metavar="PROMPT,ANSWER", help="SFT: two string fields as a user/assistant pair")
    p.add_argument("--val-fraction", default="0.01", help="fraction of examples held out, 0 <= f < 1 (default 0.01)")
    p.add_argument("--val-rows", type=int, default=1000, help="at most this many held-out examples, >= 0 "
                                                              "(default 1000)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing chat DATADIR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from doge.data.chat_prepare import ChatPrepareConfig, prepare_chat
    from doge.data.errors import run_tool  # after parsing: --help answers at once

    fields = tuple(args.fields.split(",")) if args.fields is not None else ()
    cfg = ChatPrepareConfig(inputs=args.input, tokenizer=args.tokenizer, output=args.output, kind=args.kind,
                            seq_len=args.seq_len, fields=fields, val_fraction=args.val_fraction,
                            val_rows=args.val_rows, overwrite=args.overwrite, command=["python"] + sys.argv)
    return run_tool(lambda: prepare_chat(cfg))


if __name__ == "__main__":
    sys.exit(main())
