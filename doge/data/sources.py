"""Chunks -> documents: reading a planned chunk's records as text, the normalisation rules, and
their counts.

What a document is: a txt paragraph, line or file, or a JSON/parquet/hub record's text field (a
tuple of two strings with `chat_fields`). Text is decoded as UTF-8 and normalised (BOM, CRLF/CR,
lone surrogates); whatever a rule changes or skips is counted in Stats, which the manifest sums per
source. chunk_plan.py says which chunks there are.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from doge.data.chunk_plan import (
    BOM,
    Chunk,
    ReadOptions,
    check_type,
    load_hub,
    open_source_file,
    parse_json_line,
    plan_chunks,
    record_fields,
    wanted_fields,
)
from doge.data.errors import DataError

STAT_KEYS = ("documents", "tokens", "skipped_empty", "utf8_replaced", "crlf_normalized", "bom_stripped",
             "special_token_strings")


@dataclass
class Stats:
    """Per-chunk counters (tokens is filled by the tokenizer); the manifest sums them per source."""

    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    utf8_replaced: int = 0
    crlf_normalized: int = 0
    bom_stripped: int = 0
    special_token_strings: int = 0

    def add(self, other: "Stats") -> None:
        for key in STAT_KEYS:
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def as_dict(self) -> dict:
        return {key: getattr(self, key) for key in STAT_KEYS}


def read_chunk(chunk: Chunk, opts: ReadOptions, stats: Stats):
    """Yield the documents of one chunk: str, or a tuple of strs in chat mode. Counts into stats."""
    if chunk.kind == "txt":
        for piece in _txt_documents(_read_range(chunk), opts.txt_split, stats):
            if (doc := _normalise(_decode(piece, stats), stats)) is not None:
                yield doc
    elif chunk.kind in ("jsonl", "json"):
        for where, record in _json_records(chunk, stats):
            yield from _emit(record_fields(record, opts, Path(chunk.path), where), opts, stats)
    elif chunk.kind == "parquet":
        yield from _emit_columns(_parquet_columns(chunk, opts), opts, stats)
    else:
        ds = load_hub(chunk.path)[chunk.start : chunk.end]
        yield from _emit_columns([ds[name] for name in wanted_fields(opts)], opts, stats)


def _read_range(chunk: Chunk) -> bytes:
    with open_source_file(Path(chunk.path), chunk.compressed) as f:
        if chunk.compressed:
            return f.read()
        f.seek(chunk.start)
        return f.read(chunk.end - chunk.start)


def _txt_documents(raw: bytes, mode: str, stats: Stats) -> list[bytes]:
    """Split text into documents (whole file, lines, or blank-line separated paragraphs).

    Lines ending in CRLF lose the CR here (counted once per document), so a CRLF file gives
    exactly the documents of its LF twin.
    """
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
        stats.bom_stripped += 1
    if mode == "file":
        groups = [raw.split(b"\n")]
    elif mode == "line":
        groups = [[line] for line in raw.removesuffix(b"\n").split(b"\n")]
    else:
        groups = _paragraph_groups(raw)
    return [_join_lines(lines, stats) for lines in groups]


def _paragraph_groups(raw: bytes) -> list[list[bytes]]:
    groups, current = [], []
    for line in raw.split(b"\n"):
        if line.strip():
            current.append(line)
        elif current:
            groups.append(current)
            current = []
    return groups + [current] if current else groups


def _join_lines(lines: list[bytes], stats: Stats) -> bytes:
    stripped = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if any(len(a) != len(b) for a, b in zip(lines, stripped)):
        stats.crlf_normalized += 1
    return b"\n".join(stripped)


def _decode(raw: bytes, stats: Stats) -> str:
    """UTF-8; invalid bytes become U+FFFD and the document is counted in utf8_replaced."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.utf8_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _normalise(text, stats: Stats):
    """Strip a BOM, turn CRLF/CR into LF, drop lone surrogates; None for empty documents."""
    if text is None:
        stats.skipped_empty += 1
        return None
    if text.startswith("\ufeff"):
        stats.bom_stripped += 1
        text = text[1:]
    if "\r" in text:
        stats.crlf_normalized += 1
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            stats.utf8_replaced += 1
            text = text.encode("utf-8", errors="replace").decode("utf-8")
    if not text.strip():
        stats.skipped_empty += 1
        return None
    stats.documents += 1
    return text


def _emit(values, opts: ReadOptions, stats: Stats):
    """One record's field values -> a document (or nothing, when empty)."""
    if not opts.chat_fields:
        if (doc := _normalise(values[0], stats)) is not None:
            yield doc
        return
    scratch = Stats()
    parts = tuple(_normalise(v, scratch) or "" for v in values)
    if not any(parts):
        stats.skipped_empty += 1
        return
    stats.documents += 1
    for key in ("utf8_replaced", "crlf_normalized", "bom_stripped"):
        setattr(stats, key, getattr(stats, key) + getattr(scratch, key))
    yield parts


def _emit_columns(columns, opts: ReadOptions, stats: Stats):
    for values in zip(*columns):
        for value in values:
            check_type(value, "a row", opts)
        yield from _emit(values, opts, stats)


def _json_records(chunk: Chunk, stats: Stats):
    path = Path(chunk.path)
    raw = _read_range(chunk)
    if chunk.start == 0 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
        stats.bom_stripped += 1
    if chunk.kind == "json":
        try:
            records = json.loads(_decode(raw, stats))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc}); fix the file or convert it to JSON Lines") from exc
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json file must hold a list of records (or be JSON Lines)")
        for i, record in enumerate(records):
            yield f"record {i}", record
        return
    for i, line in enumerate(raw.split(b"\n")):
        if line.strip():
            where = _LineLabel(path, chunk, i)
            yield where, parse_json_line(_decode(line, stats), path, where)


class _LineLabel:
    """A lazily computed 'line N' label (counting newlines only when an error is raised)."""

    def __init__(self, path, chunk, index):
        self.path, self.chunk, self.index = path, chunk, index

    def __str__(self):
        if self.chunk.compressed or self.chunk.start == 0:
            return f"line {self.index + 1}"
        with open(self.path, "rb") as f:
            before = f.read(self.chunk.start).count(b"\n")
        return f"line {before + self.index + 1}"


def _parquet_columns(chunk: Chunk, opts: ReadOptions):
    import pyarrow.parquet as pq

    table = pq.ParquetFile(chunk.path).read_row_group(chunk.start, columns=list(wanted_fields(opts)))
    return [table.column(name).to_pylist() for name in wanted_fields(opts)]


def check_source(spec: str, counts: dict) -> None:
    """Refuse a source that gave no text, or mostly undecodable bytes (a binary file read as
    text): either would quietly train on nothing, or on U+FFFD."""
    if counts["documents"] == 0:
        raise DataError(f"{spec}: no text ({counts['skipped_empty']} empty or whitespace-only documents); point "
                        "--input at files with text, or pass the --text-field that holds it")
    if counts["utf8_replaced"] * 2 > counts["documents"]:
        raise DataError(f"{spec}: {counts['utf8_replaced']} of {counts['documents']} documents are not valid UTF-8 "
                        "(binary data?); pass text files (decompress or convert them first)")


def iter_documents(specs: list[str], opts: ReadOptions, chunk_bytes: int = 1 << 25):
    """All documents of all sources in order (used by tokenizer training); after the last one,
    each source is checked with check_source."""
    chunks, _ = plan_chunks(specs, opts, chunk_bytes)
    stats = [Stats() for _ in specs]
    for chunk in chunks:
        yield from read_chunk(chunk, opts, stats[chunk.source])
    for spec, counts in zip(specs, stats):
        check_source(spec, counts.as_dict())
