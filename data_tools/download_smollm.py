#!/usr/bin/env python
"""Download the SmolLM pre-training corpora (needs network) and prepare one DATADIR per source.

Example (a small trial: 2 parquet files per source):
  python data_tools/download_smollm.py --tokenizer tokenizer/ --max-files 2 --workers 16

Sources (data_tools/mixtures/smollm-corpus.yaml mixes them 70/20/5/5):
  fineweb-edu-dedup  HuggingFaceTB/smollm-corpus  fineweb-edu-dedup/*.parquet  (column text)
  cosmopedia-v2      HuggingFaceTB/smollm-corpus  cosmopedia-v2/*.parquet      (text; or prompt+text as chat)
  finemath-4plus     HuggingFaceTB/finemath       finemath-4plus/*.parquet     (column text)
  python-edu         HuggingFaceTB/smollm-corpus  python-edu/*.parquet holds only blob ids: the file
                     contents live in the Software Heritage S3 bucket. Fetch them as the data set card
                     shows, write JSONL with a "text" field to DOWNLOAD_DIR/python-edu-text/, and this
                     script prepares them; without that folder python-edu is skipped with a message.

Files go to --download-dir (resumable: huggingface_hub skips finished files); each DATADIR is
written by data_tools/prepare.py's engine, so reruns resume too.
"""
import argparse
import logging
import sys
from pathlib import Path

SOURCES = {
    "fineweb-edu-dedup": ("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup"),
    "cosmopedia-v2": ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2"),
    "python-edu": (None, "python-edu-text"),
    "finemath-4plus": ("HuggingFaceTB/finemath", "finemath-4plus"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, metavar="TOKDIR", help="tokenizer folder or hub name")
    p.add_argument("--out-root", default="data/smollm-corpus",
                   help="where the four DATADIRs go (default data/smollm-corpus, what the mixture YAML expects)")
    p.add_argument("--download-dir", default="data/smollm-raw",
                   help="where parquet files are downloaded (default data/smollm-raw)")
    p.add_argument("--only", nargs="+", choices=sorted(SOURCES), help="only these sources (default: all)")
    p.add_argument("--max-files", type=int, default=0,
                   help="first N parquet files per source, for trials (default: all)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--workers", type=int, default=8, help="tokenizer processes for prepare (default 8)")
    p.add_argument("--cosmopedia-chat", action="store_true",
                   help="render cosmopedia's prompt/text as a user/assistant chat instead of using text alone")
    p.add_argument("--download-only", action="store_true", help="download, do not prepare")
    return p.parse_args(argv)


def download(repo: str, folder: str, target: Path, max_files: int) -> Path:
    """Parquet files of one folder of a hub data set repository (sorted; first max_files)."""
    from huggingface_hub import HfApi, hf_hub_download

    files = sorted(f for f in HfApi().list_repo_files(repo, repo_type="dataset")
                   if f.startswith(folder + "/") and f.endswith(".parquet"))
    if max_files:
        files = files[:max_files]
    for name in files:
        hf_hub_download(repo, name, repo_type="dataset", local_dir=target)
    return target / folder


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # imported after parsing so that --help answers at once (importing doge loads transformers)
    from doge.data import DataError
    from doge.data.chunk_plan import ReadOptions
    from doge.data.prepare import PrepareConfig, prepare
    raw, out_root = Path(args.download_dir), Path(args.out_root)
    for name in args.only or SOURCES:
        repo, folder = SOURCES[name]
        src = download(repo, folder, raw, args.max_files) if repo else raw / folder
        if not src.exists():
            print(f"skip {name}: {src} not found (see --help for how to fetch python-edu contents)", file=sys.stderr)
            continue
        if args.download_only:
            continue
        chat = ("prompt", "text") if name == "cosmopedia-v2" and args.cosmopedia_chat else ()
        cfg = PrepareConfig(inputs=[str(src)], tokenizer=args.tokenizer, output=out_root / name, seq_len=args.seq_len,
                            workers=args.workers, read=ReadOptions(chat_fields=chat), command=["python"] + sys.argv)
        try:
            print(f"prepared {prepare(cfg)}")
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
