"""The tokenizer/ copy a DATADIR ships beside its rows: the file hashes its manifest records, and
the check that the copy is still the tokenizer the rows were made with.

Checkpoints ship this copy as the model's tokenizer, so both DATADIR writers (pre-training and
chat) record it and both readers check it before any row is read.
"""
from pathlib import Path

from doge.data import shards
from doge.data.errors import DataError
from doge.data.tokenizer import tokenizer_fingerprint


def file_hashes(folder: Path) -> dict:
    """sha256 of each file of the tokenizer copy: the loader checks them, since checkpoints ship them."""
    return {p.relative_to(folder).as_posix(): shards.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def check_tokenizer_copy(datadir: Path, manifest: dict) -> None:
    """DATADIR/tokenizer/ is what checkpoints ship, so it must be the tokenizer the shards were
    made with: same fingerprint, and (manifests since the files were recorded) the same files."""
    folder = datadir / "tokenizer"
    fix = f"restore the tokenizer/ folder prepare.py wrote or re-run prepare.py to rebuild {datadir}"
    expected = manifest["tokenizer"]["fingerprint"]
    try:
        found = tokenizer_fingerprint(folder)
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder}: no readable tokenizer.json ({exc}); {fix}") from exc
    if found != expected:
        raise DataError(f"{folder}: holds tokenizer {found}, but the shards were tokenized with {expected} "
                        f"({datadir / shards.MANIFEST}); {fix}")
    for name, digest in manifest["tokenizer"].get("files", {}).items():
        if not (folder / name).is_file() or shards.sha256_file(folder / name) != digest:
            raise DataError(f"{folder / name}: missing or changed since prepare.py wrote it; {fix}")
