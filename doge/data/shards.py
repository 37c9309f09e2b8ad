"""The prepared-data format: Arrow shards of packed rows and the manifest that describes them.

A DATADIR holds `manifest.json`, `train-NNNNN.arrow` / `val-NNNNN.arrow` shards and a `tokenizer/`
copy. Each shard is an Arrow IPC stream (what `datasets.Dataset.from_file` opens) with one column
`input_ids` of fixed-size lists of `seq_len` uint16 (uint32 when the vocabulary needs it), written
as a single record batch so a reader maps the whole shard as one (rows, seq_len) array.

Rows come from one token stream (documents + EOS, in input order) cut every seq_len tokens; row r
goes to val when `val_mask` selects it, else to train, so train+val together hold every token once.
Only the stream's final row can be partial: it is padded with pad_id, and the shard's `tokens`
field (real tokens) is then less than rows * seq_len.
"""
import hashlib
import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from doge import atomic
from doge.data.errors import DataError

FORMAT = "doge-packed-shards"
CHAT_FORMAT = "doge-chat-shards"  # chat DATADIRs (doge/data/chat.py): refused here with a pointer to SFT/DPO
VERSION = 1
MANIFEST = "manifest.json"
COLUMN = "input_ids"
SPLITS = ("train", "val")
REQUIRED_KEYS = ("format", "version", "seq_len", "dtype", "tokenizer", "splits", "sources")
REBUILD = "re-run prepare.py to rebuild the DATADIR (or restore the file from a copy)"


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 halves disk and page cache whenever every id fits."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.arrow"


def val_mask(first: int, n: int, fraction: str, cap: int) -> np.ndarray:
    """Which of rows first..first+n-1 are held out for validation.

    Row r is held out when floor((r+1)f) steps up, for the first `cap` such rows: evenly spaced
    through the stream (so every source is represented) and decided from the row index alone, so
    it needs no look-ahead and is the same on every rerun.
    """
    f = Fraction(fraction)
    r = np.arange(first, first + n, dtype=np.int64)
    taken = (r + 1) * f.numerator // f.denominator
    return (taken > r * f.numerator // f.denominator) & (taken <= cap)


# ----------------------------------------------------------------------------- writing
def encode_shard(rows: np.ndarray) -> bytes:
    """(n, seq_len) integer array -> Arrow IPC stream bytes (deterministic for equal input)."""
    import pyarrow as pa

    n, seq_len = rows.shape
    values = pa.array(np.ascontiguousarray(rows).reshape(-1), type=pa.from_numpy_dtype(rows.dtype))
    column = pa.FixedSizeListArray.from_arrays(values, seq_len)
    schema = pa.schema([pa.field(COLUMN, column.type, nullable=False)])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(pa.record_batch([column], schema=schema))
    return sink.getvalue().to_pybytes()


def write_shard(directory: Path, name: str, rows: np.ndarray, tokens: int) -> dict:
    """Write one shard atomically; return its manifest entry."""
    data = encode_shard(rows)
    atomic.write_bytes(Path(directory) / name, data)
    return {
        "file": name,
        "rows": int(rows.shape[0]),
        "tokens": int(tokens),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "max_token_id": int(rows.max()) if rows.size else -1,
    }


# ----------------------------------------------------------------------------- reading
def open_shard(path: Path, entry: dict, seq_len: int, dtype: str):
    """Memory-map a shard after checking size and schema; return (read-only (rows, seq_len) array,
    the whole mapped file). `verify_shard` hashes that mapping, so the bytes checked are the bytes
    served even if the file is replaced on disk in between."""
    import pyarrow as pa

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing; {REBUILD}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(f"{path}: {size} bytes but the manifest says {entry['bytes']} (truncated or replaced); "
                        f"{REBUILD}")
    mapped = pa.memory_map(str(path))
    try:
        table = pa.ipc.open_stream(mapped).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Arrow stream ({exc}); the shard is corrupted; {REBUILD}") from exc
    expected = pa.list_(pa.field("item", pa.from_numpy_dtype(np.dtype(dtype))), seq_len)
    if table.column_names != [COLUMN] or not table.schema.field(COLUMN).type.equals(expected, check_metadata=False):
        raise DataError(f"{path}: schema {table.schema} is not input_ids: {expected}; the shard is corrupted; "
                        f"{REBUILD}")
    if table.num_rows != entry["rows"] or table.column(0).num_chunks != 1:
        raise DataError(f"{path}: {table.num_rows} rows, manifest says {entry['rows']}; {REBUILD}")
    values = table.column(0).chunk(0).values.to_numpy(zero_copy_only=True)
    mapped.seek(0)
    return values.reshape(entry["rows"], seq_len), mapped.read_buffer()


def verify_shard(path: Path, entry: dict, content) -> None:
    """Raise unless sha256(content) is the manifest's: catches changed bytes that keep the size
    and the Arrow structure intact, and a hand-edited manifest."""
    found = hashlib.sha256(content).hexdigest()
    if found != entry["sha256"]:
        raise DataError(f"{path}: sha256 {found[:16]}... differs from the manifest's {entry['sha256'][:16]}... (the "
                        f"shard is corrupted or manifest.json was edited); {REBUILD}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def content_key(manifest: dict, split: str) -> str:
    """Hash of what decides a split's samples: tokenizer, row length, dtype and each shard's
    content. Paths, options and the command line that produced them are left out, so re-preparing
    the same data (say with another --workers) gives the same key."""
    spec = {
        "tokenizer": manifest["tokenizer"]["fingerprint"],
        "seq_len": manifest["seq_len"],
        "dtype": manifest["dtype"],
        "shards": [[e["sha256"], e["rows"], e["tokens"]] for e in manifest["splits"][split]["shards"]],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- manifest
def read_manifest(datadir: Path) -> dict:
    """Load and sanity-check DATADIR/manifest.json."""
    datadir = Path(datadir)
    path = datadir / MANIFEST
    if not path.is_file():
        partial = datadir.with_name(datadir.name + ".partial")
        hint = ""
        if partial.exists():
            hint = f"; {partial} exists: prepare did not finish, re-run the same command to resume"
        raise DataError(f"{path}: no manifest; {datadir} is not a prepared DATADIR (run data_tools/prepare.py){hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run prepare.py") from exc
    if isinstance(manifest, dict) and manifest.get("format") == CHAT_FORMAT:
        raise DataError(f"{datadir} is a chat DATADIR (made by data_tools/prepare_chat.py): train on it with "
                        "doge/sft.py or doge/dpo.py; pre-training takes a DATADIR from data_tools/prepare.py")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest (missing {missing or 'format'}); re-run prepare.py")
    if manifest["version"] != VERSION:
        raise DataError(f"{path}: format version {manifest['version']}, this doge reads {VERSION}; re-run prepare.py")
    return manifest


def full_rows(entry: dict, seq_len: int) -> int:
    """Rows without padding (only a stream's last row can be padded)."""
    return min(entry["rows"], entry["tokens"] // seq_len)
