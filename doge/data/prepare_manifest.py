"""What manifest.json says about a finished prepare: split totals, each source's counts, the layout.

Every source is checked here (it must have given text) before the manifest exists, so a DATADIR
with a manifest never holds a source that quietly gave nothing.
"""
from pathlib import Path

from doge.data import shards
from doge.data.sources import STAT_KEYS, check_source
from doge.data.tokenizer_copy import file_hashes


def build_manifest(work: Path, layout: dict, described: list, state: dict, command: list) -> dict:
    """The manifest of the run whose committed state is `state`; raises DataError for a source
    that gave no text."""
    splits = {
        split: {
            "rows": sum(e["rows"] for e in state[split]),
            "tokens": sum(e["tokens"] for e in state[split]),
            "shards": state[split],
        }
        for split in shards.SPLITS
    }
    sources = [dict(d, **state["sources"].get(str(i), dict.fromkeys(STAT_KEYS, 0))) for i, d in enumerate(described)]
    for source in sources:
        check_source(source["spec"], source)
    return {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "seq_len": layout["seq_len"],
        "dtype": layout["dtype"],
        "tokenizer": dict(layout["tokenizer"], files=file_hashes(work / "tokenizer")),
        "splits": splits,
        "val_fraction": layout["val_fraction"],
        "val_rows": layout["val_rows"],
        "pad_tokens": state.get("pad_tokens", 0),
        "sources": sources,
        "options": {"read": layout["read"], "shard_rows": layout["shard_rows"], "chunks": len(layout["chunks"])},
        "command": list(command),
    }
