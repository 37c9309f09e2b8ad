"""Raw corpora -> documents: SRC specs, work chunks, and the text normalisation rules.

A SRC is a local file, folder or glob (txt, jsonl/json, parquet, optionally .gz) or a `datasets`
name written `hf:NAME[:CONFIG[:SPLIT]]`. Sources are cut into chunks (byte ranges that end on a
document boundary, parquet row groups, or row ranges) whose list depends only on the input and the
chunk size, never on the worker count: that is what makes prepare's output reproducible.
"""
import glob as globlib
import gzip
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from doge.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TXT_SPLITS = ("paragraph", "line", "file")
BOM = b"\xef\xbb\xbf"
STAT_KEYS = ("documents", "tokens", "skipped_empty", "utf8_replaced", "crlf_normalized", "bom_stripped",
             "special_token_strings")


@dataclass(frozen=True)
class ReadOptions:
    """How records become documents. `chat_fields` (prompt, answer) switches to chat records.
    `parse_special_tokens` reads strings such as `</s>` inside the text as the control tokens
    themselves (for pre-rendered chat data); by default they are text like any other."""

    text_field: str = "text"
    txt_split: str = "paragraph"
    chat_fields: tuple = ()
    parse_special_tokens: bool = False


@dataclass(frozen=True)
class Chunk:
    """One unit of parallel work: rows or bytes [start, end) of one file or data set."""

    source: int
    path: str
    kind: str  # txt | jsonl | json | parquet | hf
    start: int
    end: int
    compressed: bool = False


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


# ----------------------------------------------------------------------------- resolving SRC specs
def resolve_files(spec: str) -> list[Path]:
    """A file, folder (recursive) or glob -> sorted list of supported files."""
    path = Path(spec)
    if path.is_file():
        _kind_of(path)  # raises on unsupported types
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind_or_none(p))
        if not files:
            raise DataError(f"{spec}: folder holds no txt/jsonl/json/parquet files; point --input at the data files")
        return files
    matches = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
    files = [p for p in matches if _kind_or_none(p)]
    if not files:
        raise DataError(
            f"{spec}: no such file, folder or glob match; check the path, or write a hub data set as "
            "hf:NAME[:CONFIG[:SPLIT]]"
        )
    return files


def _kind_or_none(path: Path):
    name = path.name.lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[:-3]
    for kind, suffixes in (("txt", TEXT_SUFFIXES), ("jsonl", JSON_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            if kind == "parquet" and compressed:
                return None
            return kind, compressed
    return None


def _kind_of(path: Path):
    kind = _kind_or_none(path)
    if kind is None:
        raise DataError(
            f"{path}: unsupported file type; use .txt/.text/.raw/.md, .jsonl/.json/.ndjson (optionally .gz) "
            "or .parquet, or rename the file"
        )
    return kind


def parse_hub_spec(spec: str):
    """`hf:NAME[:CONFIG[:SPLIT]]` -> (name, config or None, split)."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec}: write a hub data set as hf:NAME[:CONFIG[:SPLIT]], e.g. "
                        "hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2:train")
    name, config, split = (parts + [None, None])[:3]
    return name, config or None, split or "train"


# ----------------------------------------------------------------------------- planning chunks
def plan_chunks(specs: list[str], opts: ReadOptions, chunk_bytes: int) -> tuple[list[Chunk], list[dict]]:
    """Every source cut into chunks, plus a description of each source for the manifest."""
    chunks, described = [], []
    for index, spec in enumerate(specs):
        if spec.startswith("hf:"):
            source_chunks, files = _plan_hub(index, spec, opts, chunk_bytes), [spec]
        else:
            paths = resolve_files(spec)
            source_chunks = [c for p in paths for c in _plan_file(index, p, opts, chunk_bytes)]
            files = [{"path": str(p), "bytes": p.stat().st_size} for p in paths]
        chunks += source_chunks
        described.append({"spec": spec, "files": files})
    return chunks, described


def _plan_file(source: int, path: Path, opts: ReadOptions, chunk_bytes: int) -> list[Chunk]:
    kind, compressed = _kind_of(path)
    if kind == "parquet":
        return _plan_parquet(source, path, opts)
    if kind == "jsonl":
        kind = _json_flavour(path, compressed)
        _check_first_record(path, kind, compressed, opts)
    size = path.stat().st_size
    if compressed or kind == "json" or (kind == "txt" and opts.txt_split == "file"):
        return [Chunk(source, str(path), kind, 0, size, compressed)]
    mode = "paragraph" if kind == "txt" and opts.txt_split == "paragraph" else "line"
    points = _split_points(path, size, chunk_bytes, mode)
    return [Chunk(source, str(path), kind, a, b) for a, b in zip(points, points[1:])]


def _split_points(path: Path, size: int, chunk_bytes: int, mode: str) -> list[int]:
    """Byte offsets near multiples of chunk_bytes that begin a line (or a paragraph)."""
    points = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            f.seek(target - 1)
            f.readline()  # finish the current line
            if mode == "paragraph":
                while (line := f.readline()) and line.strip():
                    pass
            boundary = f.tell()
            if boundary >= size:
                break
            points.append(boundary)
            target = boundary + chunk_bytes
    points.append(size)
    return points


def _json_flavour(path: Path, compressed: bool) -> str:
    """`.json` files are JSON Lines unless they start with `[` (an array, read whole)."""
    with _reading(path, compressed) as f:
        head = f.read(4096).lstrip(BOM).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


def _check_first_record(path: Path, kind: str, compressed: bool, opts: ReadOptions) -> None:
    """Fail before any work starts when the first record lacks the field (the usual mistake)."""
    if kind != "jsonl":
        return
    with _reading(path, compressed) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                _record_fields(_parse_json_line(line, path, f"line {lineno}"), opts, path, f"line {lineno}")
                return


def _plan_parquet(source: int, path: Path, opts: ReadOptions) -> list[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: not a readable parquet file ({exc}); re-download or remove it") from exc
    names = pf.schema_arrow.names
    for name in _wanted_fields(opts):
        if name not in names:
            raise DataError(f"{path}: no column {name!r} (columns: {', '.join(names)}); {_field_fix(opts)}")
    return [Chunk(source, str(path), "parquet", g, g + 1) for g in range(pf.num_row_groups)]


def _plan_hub(source: int, spec: str, opts: ReadOptions, chunk_bytes: int) -> list[Chunk]:
    ds = _load_hub(spec)
    for name in _wanted_fields(opts):
        if name not in ds.column_names:
            raise DataError(f"{spec}: no column {name!r} (columns: {', '.join(ds.column_names)}); {_field_fix(opts)}")
    rows = len(ds)
    per_row = max(1, ds.data.nbytes // max(rows, 1))
    step = max(1, chunk_bytes // per_row)
    return [Chunk(source, spec, "hf", a, min(a + step, rows)) for a in range(0, rows, step)]


_HUB_CACHE: dict = {}


def _load_hub(spec: str):
    """`datasets.load_dataset` (local cache, or the hub when online), memoised per process."""
    if spec not in _HUB_CACHE:
        import datasets

        name, config, split = parse_hub_spec(spec)
        try:
            _HUB_CACHE[spec] = datasets.load_dataset(name, config, split=split)
        except Exception as exc:
            raise DataError(
                f"{spec}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: {exc}; check the "
                "name/config/split, go online once to fill the cache, or pass local files"
            ) from exc
    return _HUB_CACHE[spec]


# ----------------------------------------------------------------------------- reading chunks
def read_chunk(chunk: Chunk, opts: ReadOptions, stats: Stats):
    """Yield the documents of one chunk: str, or a tuple of strs in chat mode. Counts into stats."""
    if chunk.kind == "txt":
        for piece in _txt_documents(_read_range(chunk), opts.txt_split, stats):
            if (doc := _normalise(_decode(piece, stats), stats)) is not None:
                yield doc
    elif chunk.kind in ("jsonl", "json"):
        for where, record in _json_records(chunk, stats):
            yield from _emit(_record_fields(record, opts, Path(chunk.path), where), opts, stats)
    elif chunk.kind == "parquet":
        yield from _emit_columns(_parquet_columns(chunk, opts), opts, stats)
    else:
        ds = _load_hub(chunk.path)[chunk.start : chunk.end]
        yield from _emit_columns([ds[name] for name in _wanted_fields(opts)], opts, stats)


def _read_range(chunk: Chunk) -> bytes:
    with _reading(Path(chunk.path), chunk.compressed) as f:
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
            _check_type(value, "a row", opts)
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
            yield where, _parse_json_line(line, path, where, stats)


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


def _parse_json_line(line: bytes, path: Path, where, stats: Stats | None = None):
    text = _decode(line, stats) if stats is not None else line.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {where}: invalid JSON ({exc}); fix or remove that line") from exc


def _wanted_fields(opts: ReadOptions) -> tuple:
    return tuple(opts.chat_fields) or (opts.text_field,)


def _field_fix(opts: ReadOptions) -> str:
    return "pass --chat-fields PROMPT,ANSWER naming existing fields" if opts.chat_fields else "pass --text-field NAME"


def _record_fields(record, opts: ReadOptions, path: Path, where) -> tuple:
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    values = []
    for name in _wanted_fields(opts):
        if name not in record:
            fields = ", ".join(record) or "none"
            raise DataError(f"{path}: {where}: no field {name!r} (fields: {fields}); {_field_fix(opts)}")
        value = record[name]
        if value is not None and not isinstance(value, str):
            _check_type(value, f"{path}: {where}: field {name!r}", opts)
        values.append(value)
    return tuple(values)


def _check_type(value, where: str, opts: ReadOptions):
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where} is a {type(value).__name__}, not text; {_field_fix(opts)} naming a text field")
    return value


def _parquet_columns(chunk: Chunk, opts: ReadOptions):
    import pyarrow.parquet as pq

    table = pq.ParquetFile(chunk.path).read_row_group(chunk.start, columns=list(_wanted_fields(opts)))
    return [table.column(name).to_pylist() for name in _wanted_fields(opts)]


@contextmanager
def _reading(path: Path, compressed: bool):
    """The file opened for binary reads; a truncated or mislabelled .gz becomes a DataError naming
    it (gzip raises EOFError or BadGzipFile, which read as crashes)."""
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            yield f
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a complete gzip file ({exc}); re-download it, or rename it without .gz "
                        "if it is not compressed") from exc


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
