"""Atomic file writes: readers see either nothing or the complete file, even after kill -9."""
import json
import os
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    """JSON with sorted keys and a trailing newline, so equal content gives equal bytes."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
