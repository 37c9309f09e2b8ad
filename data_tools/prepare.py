#!/usr/bin/env python
"""Tokenize, append EOS, pack into rows of --seq-len tokens, and shard into a DATADIR.

Example:
  python data_tools/prepare.py --input corpus/ --tokenizer tokenizer/ --seq-len 2048 --output data/web --workers 8

DATADIR gets train-NNNNN.arrow / val-NNNNN.arrow (each opens with datasets.Dataset.from_file),
manifest.json (tokenizer fingerprint, seq_len, dtype, rows/tokens/sha256 per shard, per-source
document counts, this command) and a tokenizer/ copy. Output bytes do not depend on --workers.
Special-token strings inside the text (</s>, <|im_start|>) are encoded as text unless
--parse-special-tokens is given; their number is counted in the manifest either way.
Work happens in DATADIR.partial/, renamed to DATADIR when complete; rerun the same command after
a crash or kill and it continues after the last finished shard.
"""
import argparse
import logging
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="text (.txt/.text/.raw/.md), JSON Lines / JSON (.jsonl/.json, optionally .gz) or parquet "
                        "files, folders (searched recursively) or globs; or a datasets name written "
                        "hf:NAME[:CONFIG[:SPLIT]] (read from the local cache, or the hub when online)")
    p.add_argument("--tokenizer", required=True, metavar="TOKDIR",
                   help="tokenizer folder (from train_tokenizer.py or any fast transformers tokenizer) or hub name")
    p.add_argument("--output", required=True, metavar="DATADIR", help="folder to create")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row (default 2048)")
    p.add_argument("--text-field", default="text",
                   help="field/column with the text in JSON/parquet/hub data (default text)")
    p.add_argument("--chat-fields", metavar="PROMPT,ANSWER",
                   help="render two fields as a user/assistant chat with the tokenizer's chat template "
                        "(e.g. prompt,text for cosmopedia) instead of reading --text-field")
    p.add_argument("--txt-split", choices=("paragraph", "line", "file"), default="paragraph",
                   help="what a document is in a text file: blank-line separated paragraph (default), line, or file")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="read special-token strings inside the text (</s>, <|im_start|>, ...) as the control tokens "
                        "themselves, for pre-rendered chat data; by default they are plain text (counted in the "
                        "manifest)")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (default 1); output is identical for any value")
    p.add_argument("--val-fraction", default="0.001",
                   help="fraction of rows held out for validation, evenly spaced through the stream (default 0.001)")
    p.add_argument("--val-rows", type=int, default=10000, help="at most this many validation rows (default 10000)")
    p.add_argument("--shard-rows", type=int, default=0,
                   help="rows per train shard (default: about 134M tokens, i.e. 65536 rows at seq_len 2048)")
    p.add_argument("--chunk-mb", type=float, default=0,
                   help="input MB per work unit (default 0: 1/256 of the input, within 0.25-32 MB); does not change "
                        "the output, but a resumed run must use the same value")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DATADIR once the new one is complete (only a folder prepare.py wrote "
                        "that holds nothing else)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # imported after parsing so that --help answers at once (importing doge loads transformers)
    from doge.data.chunk_plan import ReadOptions
    from doge.data.errors import run_tool
    from doge.data.prepare import PrepareConfig, prepare
    chat = tuple(args.chat_fields.split(",")) if args.chat_fields else ()
    if chat and len(chat) != 2:
        print("error: --chat-fields takes two field names, PROMPT,ANSWER", file=sys.stderr)
        return 2
    cfg = PrepareConfig(
        inputs=args.input, tokenizer=args.tokenizer, output=args.output, seq_len=args.seq_len,
        workers=args.workers, val_fraction=args.val_fraction, val_rows=args.val_rows, shard_rows=args.shard_rows,
        chunk_bytes=int(args.chunk_mb * 2**20),
        read=ReadOptions(text_field=args.text_field, txt_split=args.txt_split, chat_fields=chat,
                         parse_special_tokens=args.parse_special_tokens),
        overwrite=args.overwrite, command=["python"] + sys.argv,
    )
    return run_tool(lambda: prepare(cfg, progress_bar=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
