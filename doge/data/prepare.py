"""Tokenize, pack and shard raw corpora into a DATADIR (the engine behind data_tools/prepare.py).

Workers tokenize chunks (see chunk_plan.py) in parallel; the main process takes their results in
chunk order, so the token stream, and therefore every shard byte, is the same for any worker
count. Everything is written under DATADIR.partial/ and renamed to DATADIR when complete. After
each shard the main process records in progress.json where the next shard starts (chunk index and
token offset), so a rerun after kill -9 skips finished shards and re-tokenizes only from there.
An exclusive lock on DATADIR.partial/ keeps a second prepare off the same output.

This module is the run: options, the work folder and its resume point, the worker pool and the
order of its results, the notices and the final rename. The workers run chunk_tokenizer.py;
packer.py cuts the rows and commits shards and progress; prepare_manifest.py describes the result.
"""
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from itertools import islice
from pathlib import Path

from doge import atomic
from doge.data import shards
from doge.data.chunk_plan import ReadOptions, plan_chunks, resolve_files
from doge.data.chunk_tokenizer import chat_template_runs, init_worker, tokenize_chunk
from doge.data.encode import make_encoder
from doge.data.errors import DataError, from_os_error
from doge.data.packer import PROGRESS, Packer
from doge.data.prepare_manifest import build_manifest
from doge.data.tokenizer import load_tokenizer, pad_id, special_pattern, tokenizer_fingerprint

log = logging.getLogger(__name__)
NOTICES = {
    "skipped_empty": "skipped {} empty or whitespace-only documents",
    "utf8_replaced": "replaced invalid UTF-8 with U+FFFD in {} documents",
    "crlf_normalized": "turned CRLF/CR line ends into LF in {} documents",
    "bom_stripped": "removed {} byte-order marks",
    "special_token_strings": "found {} special-token strings (such as </s>) inside the text",
}
SPECIAL_HOW = ("encoded as plain text; pass --parse-special-tokens if they are meant as control tokens",
               "read as control tokens (--parse-special-tokens)")


@dataclass
class PrepareConfig:
    inputs: list
    tokenizer: str
    output: Path
    seq_len: int = 2048
    workers: int = 1
    val_fraction: str = "0.001"
    val_rows: int = 10000
    shard_rows: int = 0  # 0: about 2**27 tokens per shard
    chunk_bytes: int = 0  # 0: auto_chunk_bytes(inputs)
    read: ReadOptions = field(default_factory=ReadOptions)
    overwrite: bool = False
    command: list = field(default_factory=list)


def prepare(cfg: PrepareConfig, progress_bar: bool = True) -> Path:
    """Run (or resume) a prepare; return the finished DATADIR."""
    out = Path(cfg.output)
    work = out.with_name(out.name + ".partial")
    _check_options(cfg)
    if out.exists():
        _check_replaceable(out, cfg.overwrite)
    tok = load_tokenizer(cfg.tokenizer)
    chunks, described = plan_chunks(cfg.inputs, cfg.read, cfg.chunk_bytes or auto_chunk_bytes(cfg.inputs))
    try:
        with _locked(work):
            _run(cfg, tok, chunks, described, work, progress_bar)
    except OSError as exc:  # a full disk, a read-only or vanished location
        raise from_os_error(exc, work) from exc
    return out


def _check_options(cfg: PrepareConfig) -> None:
    if cfg.workers < 1 or cfg.chunk_bytes < 0:
        raise DataError(f"--workers {cfg.workers} / --chunk-mb: need at least 1 worker and a chunk size >= 0")
    if cfg.seq_len < 2:
        raise DataError(f"--seq-len {cfg.seq_len}: must be at least 2")
    try:
        fraction = Fraction(cfg.val_fraction)
    except (ValueError, ZeroDivisionError):
        fraction = None
    if fraction is None or not 0 <= fraction < 1:
        raise DataError(f"--val-fraction {cfg.val_fraction}: must be a number in [0, 1)")


def _run(cfg: PrepareConfig, tok, chunks, described, work: Path, progress_bar: bool) -> None:
    # The workers start on the chunks after the resume point while the layout is hashed and
    # checked (a third of a second); if the check fails, their results are dropped unread.
    with _workers(cfg, tok) as pool:
        start = _resume_chunk(work, len(chunks))
        results = _ordered(pool, tokenize_chunk, chunks[start:], 2 * cfg.workers)
        layout = _layout(cfg, tok, chunks, described)
        state = _open_work(work, layout, tok)
        assert state["chunk"] == start, "progress.json changed while prepare read it"
        try:
            _pack(work, layout, chunks, state, results, progress_bar)
            _finish(cfg, work, layout, described, state)
        except DataError:
            shutil.rmtree(work, ignore_errors=True)  # bad input: a rerun would fail the same way
            raise


@contextmanager
def _locked(work: Path):
    """Hold an exclusive lock on the work folder, so a second prepare on the same output stops at
    once instead of interleaving its shards with ours. The kernel drops it when we die."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataError(f"{work}: another prepare.py is writing this output now; wait for it to finish (or stop "
                        "it), then rerun") from None
    except OSError as exc:  # some network filesystems have no flock
        log.warning("%s: cannot lock (%s); make sure no other prepare.py writes this output", work, exc.strerror)
    try:
        yield
    finally:
        os.close(fd)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """--overwrite replaces only a DATADIR prepare.py wrote, and only when it holds nothing else:
    raw inputs or notes kept in the output folder must never be deleted."""
    if not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it or choose another --output")
    try:
        manifest = shards.read_manifest(out)
    except DataError:
        raise DataError(f"{out}: exists and is not a DATADIR written by prepare.py (no valid {shards.MANIFEST}); "
                        "--overwrite replaces only those: move its contents away or choose another --output") from None
    own = {shards.MANIFEST, PROGRESS, "tokenizer"} | {e["file"] for split in shards.SPLITS
                                                         for e in manifest["splits"][split]["shards"]}
    foreign = sorted(n for n in os.listdir(out) if n not in own and not n.startswith(atomic.TMP_PREFIX))
    if foreign:
        raise DataError(f"{out}: holds files prepare.py did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); --overwrite would delete them: move them out of "
                        "the folder or choose another --output")


def auto_chunk_bytes(inputs: list) -> int:
    """About 1/256 of the local input, between 256 KB and 32 MB: enough chunks to keep every
    worker busy on small corpora, few enough that planning stays cheap on huge ones. Chunking
    never changes the output bytes (chunks end on document boundaries), only the work split."""
    total = sum(f.stat().st_size for spec in inputs if not spec.startswith("hf:") for f in resolve_files(spec))
    return min(32 << 20, max(256 << 10, total // 256))


def _layout(cfg: PrepareConfig, tok, chunks, described) -> dict:
    """Everything that decides the output bytes; its hash guards resuming against changed input."""
    seq_len = cfg.seq_len
    fraction = Fraction(cfg.val_fraction).limit_denominator(10**6)
    layout = {
        "seq_len": seq_len,
        "dtype": shards.dtype_for_vocab(len(tok)),
        "shard_rows": cfg.shard_rows or max(1, (1 << 27) // seq_len),
        "val_fraction": str(fraction),
        "val_rows": cfg.val_rows,
        "read": asdict(cfg.read),
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tok),
            "vocab_size": len(tok),
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "pad_id": pad_id(tok),
            "name_or_path": str(cfg.tokenizer),
        },
        "inputs": [[d["spec"], d["files"]] for d in described],
        "chunks": [[c.source, c.path, c.kind, c.start, c.end, c.compressed] for c in chunks],
        "mtimes": [os.stat(c.path).st_mtime_ns if os.path.exists(c.path) else 0 for c in chunks],
    }
    layout["id"] = hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()
    return layout


def _resume_chunk(work: Path, n_chunks: int) -> int:
    """Where an interrupted run left off, guessed before _open_work checks that it is this run:
    0 when there is none, or when progress.json is unreadable or foreign (which _open_work rejects)."""
    try:
        chunk = json.loads((work / PROGRESS).read_text())["chunk"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return chunk if isinstance(chunk, int) and 0 <= chunk <= n_chunks else 0


def _open_work(work: Path, layout: dict, tok) -> dict:
    """Fresh state, or the committed state of an interrupted run of the same layout."""
    progress = work / PROGRESS
    if progress.is_file():
        state = json.loads(progress.read_text())
        if state["layout"] != layout["id"]:
            raise DataError(
                f"{work}: left by an interrupted prepare with different inputs or options; rerun that "
                "exact command to finish it, or delete the folder to start over"
            )
        return state
    work.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(work / "tokenizer")
    state = {"layout": layout["id"], "next_row": 0, "chunk": 0, "chunk_token_start": 0, "offset": 0,
             "sources": {}, "train": [], "val": []}
    atomic.write_json(progress, state)
    return state


def _workers(cfg: PrepareConfig, tok):
    """Forked tokenizing processes. They inherit the encoder, built once here, and `tok` itself
    (for chat templates), so none of them loads or checks the tokenizer again."""
    ctx = multiprocessing.get_context("fork")
    special = special_pattern(tok)
    chat = chat_template_runs(tok, special) if cfg.read.chat_fields and not cfg.read.parse_special_tokens else None
    init = (make_encoder(tok.backend_tokenizer), tok, tok.eos_token_id, cfg.read, shards.dtype_for_vocab(len(tok)),
            cfg.workers > 1, special, chat)
    return ctx.Pool(cfg.workers, initializer=init_worker, initargs=init)


def _pack(work: Path, layout: dict, chunks, state: dict, results, progress_bar: bool) -> None:
    """Feed the workers' results to the packer in chunk order, then commit what is left."""
    from tqdm import tqdm

    packer = Packer(work, layout, state)
    with tqdm(total=len(chunks), initial=state["chunk"], unit="chunk", desc="prepare", disable=not progress_bar) as bar:
        for index, (tokens, stats) in zip(range(state["chunk"], len(chunks)), results):
            packer.feed(index, chunks[index].source, tokens, stats)
            bar.update(1)
            bar.set_postfix(rows=packer.first_row + packer.buffered_rows(), refresh=False)
    packer.finish()


def _ordered(pool, func, items, window: int):
    """Like pool.imap, but with at most `window` results in flight, so memory stays bounded.
    The first `window` items are submitted at once, before any result is asked for."""
    items = iter(items)
    pending = deque(pool.apply_async(func, (item,)) for item in islice(items, window))
    return _in_order(pool, func, items, pending)


def _in_order(pool, func, items, pending: deque):
    """Yield results in submission order, topping the window up by one as each arrives."""
    while pending:
        result = pending.popleft().get()
        for item in islice(items, 1):
            pending.append(pool.apply_async(func, (item,)))
        yield result


def _finish(cfg: PrepareConfig, work: Path, layout: dict, described, state: dict) -> None:
    """Check every source gave text, write the manifest, then make the DATADIR visible with one rename."""
    out = Path(cfg.output)
    manifest = build_manifest(work, layout, described, state, cfg.command)
    _log_notices(manifest["sources"], cfg.read)
    atomic.write_json(work / shards.MANIFEST, manifest)
    if out.exists():  # made by someone else while we worked
        _check_replaceable(out, cfg.overwrite)
    atomic.publish_dir(work, out, replace=True)
    (out / PROGRESS).unlink()  # after the rename: a kill in between leaves a complete DATADIR


def _log_notices(sources: list, read: ReadOptions) -> None:
    for source in sources:
        for key, text in NOTICES.items():
            if source[key]:
                how = f"; {SPECIAL_HOW[read.parse_special_tokens]}" if key == "special_token_strings" else ""
                log.warning("%s: %s%s (counted in manifest.json sources[].%s)", source["spec"],
                            text.format(source[key]), how, key)
