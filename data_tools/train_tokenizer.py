#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer and save it as a transformers tokenizer folder.

Example:
  python data_tools/train_tokenizer.py --input corpus/*.jsonl --vocab-size 32768 --output tokenizer/

The folder loads with AutoTokenizer.from_pretrained(TOKDIR) as a fast tokenizer: byte fallback
(no input is ever unknown), <s> </s> <pad> <unk>, ChatML tokens <|im_start|> <|im_end|> and a
chat template. Same input and flags give the same tokenizer.
"""
import argparse
import logging
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="text (.txt/.text/.raw/.md), JSON Lines / JSON (.jsonl/.json, optionally .gz) or parquet "
                        "files, folders (searched recursively) or globs; or hf:NAME[:CONFIG[:SPLIT]]")
    p.add_argument("--output", required=True, metavar="TOKDIR", help="tokenizer folder to create (must not exist)")
    p.add_argument("--vocab-size", type=int, default=32768,
                   help="total vocabulary including special and chat tokens (default 32768, as in Doge)")
    p.add_argument("--text-field", default="text", help="field/column holding the text in JSON/parquet (default text)")
    p.add_argument("--txt-split", choices=("paragraph", "line", "file"), default="paragraph",
                   help="what a document is in a text file: blank-line separated paragraph (default), line, or file")
    p.add_argument("--max-sentences", type=int, default=0,
                   help="train on a seeded random sample of this many text pieces (0 = all; use e.g. 10000000 "
                        "for large corpora to bound memory)")
    p.add_argument("--seed", type=int, default=0, help="seed for that sampling (default 0)")
    p.add_argument("--threads", type=int, default=0, help="sentencepiece training threads (default: all cores)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # imported after parsing so that --help answers at once (importing doge loads transformers)
    from doge.data.chunk_plan import ReadOptions
    from doge.data.errors import run_tool
    from doge.data.tokenizer import train_tokenizer
    opts = ReadOptions(text_field=args.text_field, txt_split=args.txt_split)
    return run_tool(lambda: train_tokenizer(args.input, args.output, args.vocab_size, opts, args.max_sentences,
                                            args.seed, args.threads))


if __name__ == "__main__":
    sys.exit(main())
