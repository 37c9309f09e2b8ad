"""SRC specs -> the chunk plan: which files or data sets a SRC names, and how they are cut into work.

A SRC is a local file, folder or glob (txt, jsonl/json, parquet, optionally .gz) or a `datasets`
name written `hf:NAME[:CONFIG[:SPLIT]]`. Sources are cut into chunks (byte ranges that end on a
document boundary, parquet row groups, or row ranges) whose list depends only on the input and the
chunk size, never on the worker count: that is what makes prepare's output reproducible.

Planning checks each source's fields (a parquet or hub column, the first JSON Lines record) before
any work starts, so the rules for a record's fields live here too; sources.py reads the chunks.
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


# ----------------------------------------------------------------------------- resolving SRC specs
def resolve_files(spec: str) -> list[Path]:
    """A file, folder (recursive) or glob -> sorted list of supported files."""
    path = Path(spec)
    if path.is_file():
        kind_of(path)  # raises on unsupported types
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


def kind_of(path: Path):
    """(kind, compressed) of a supported file; DataError naming the supported suffixes otherwise."""
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


_HUB_CACHE: dict = {}


def load_hub(spec: str):
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


@contextmanager
def open_source_file(path: Path, compressed: bool):
    """The file opened for binary reads; a truncated or mislabelled .gz becomes a DataError naming
    it (gzip raises EOFError or BadGzipFile, which read as crashes)."""
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            yield f
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a complete gzip file ({exc}); re-download it, or rename it without .gz "
                        "if it is not compressed") from exc


# ----------------------------------------------------------------------------- records and their fields
def parse_json_line(text: str, path: Path, where):
    """One JSON Lines record, or a DataError naming the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: {where}: invalid JSON ({exc}); fix or remove that line") from exc


def wanted_fields(opts: ReadOptions) -> tuple:
    """The fields (or columns) a document is read from."""
    return tuple(opts.chat_fields) or (opts.text_field,)


def _field_fix(opts: ReadOptions) -> str:
    return "pass --chat-fields PROMPT,ANSWER naming existing fields" if opts.chat_fields else "pass --text-field NAME"


def record_fields(record, opts: ReadOptions, path: Path, where) -> tuple:
    """A JSON record's wanted field values (str or None); DataError naming the record otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(record).__name__}")
    values = []
    for name in wanted_fields(opts):
        if name not in record:
            fields = ", ".join(record) or "none"
            raise DataError(f"{path}: {where}: no field {name!r} (fields: {fields}); {_field_fix(opts)}")
        value = record[name]
        if value is not None and not isinstance(value, str):
            check_type(value, f"{path}: {where}: field {name!r}", opts)
        values.append(value)
    return tuple(values)


def check_type(value, where: str, opts: ReadOptions):
    """`value` if it is text or None; a DataError saying which field to read instead otherwise."""
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where} is a {type(value).__name__}, not text; {_field_fix(opts)} naming a text field")
    return value


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
    kind, compressed = kind_of(path)
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
    with open_source_file(path, compressed) as f:
        head = f.read(4096).lstrip(BOM).lstrip()
    return "json" if head.startswith(b"[") else "jsonl"


def _check_first_record(path: Path, kind: str, compressed: bool, opts: ReadOptions) -> None:
    """Fail before any work starts when the first record lacks the field (the usual mistake)."""
    if kind != "jsonl":
        return
    with open_source_file(path, compressed) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                record = parse_json_line(line.decode("utf-8", errors="replace"), path, f"line {lineno}")
                record_fields(record, opts, path, f"line {lineno}")
                return


def _plan_parquet(source: int, path: Path, opts: ReadOptions) -> list[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: not a readable parquet file ({exc}); re-download or remove it") from exc
    names = pf.schema_arrow.names
    for name in wanted_fields(opts):
        if name not in names:
            raise DataError(f"{path}: no column {name!r} (columns: {', '.join(names)}); {_field_fix(opts)}")
    return [Chunk(source, str(path), "parquet", g, g + 1) for g in range(pf.num_row_groups)]


def _plan_hub(source: int, spec: str, opts: ReadOptions, chunk_bytes: int) -> list[Chunk]:
    ds = load_hub(spec)
    for name in wanted_fields(opts):
        if name not in ds.column_names:
            raise DataError(f"{spec}: no column {name!r} (columns: {', '.join(ds.column_names)}); {_field_fix(opts)}")
    rows = len(ds)
    per_row = max(1, ds.data.nbytes // max(rows, 1))
    step = max(1, chunk_bytes // per_row)
    return [Chunk(source, spec, "hf", a, min(a + step, rows)) for a in range(0, rows, step)]
