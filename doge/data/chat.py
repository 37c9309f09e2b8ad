"""Chat and preference data for post-training: the chat DATADIR format and its reader.

A chat DATADIR holds `manifest.json` (format `doge-chat-shards`, kind `sft` or `dpo`), per split a
shard of token rows (`train-00000.arrow`, the pre-training shard format) and a shard of the same
shape holding the loss mask (`train-00000.mask.arrow`, uint8), and a `tokenizer/` copy
(chat_prepare.py writes it).

Packing is off: one conversation (SFT) or one response (DPO: chosen row 2i, rejected row 2i+1) per
row, padded to seq_len. Rows never share attention, and with right padding the causal model never
lets a real token see a pad token, so the trainer can cut a micro-batch to its longest row.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from doge.data import shards
from doge.data.errors import DataError
from doge.data.permutation import permute, round_keys
from doge.data.tokenizer_copy import check_tokenizer_copy

FORMAT, VERSION = shards.CHAT_FORMAT, 1
KINDS = ("sft", "dpo")
TOOL = "data_tools/prepare_chat.py"
_PRETRAIN_TOOL = re.compile(r"(?<![\w/])(?:data_tools/)?prepare\.py")


def chat_fix(err: DataError) -> DataError:
    """The shard and tokenizer-copy checks are shared with pre-training DATADIRs, whose messages
    name data_tools/prepare.py as the fix; a chat DATADIR is rebuilt by data_tools/prepare_chat.py."""
    return DataError(_PRETRAIN_TOOL.sub(TOOL, str(err)))


def read_chat_manifest(datadir: Path) -> dict:
    path = Path(datadir) / shards.MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: no readable manifest ({exc}); prepare the data with {TOOL}") \
            from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path}: not a {FORMAT} v{VERSION} manifest (a pre-training DATADIR?); prepare the data "
                        f"with {TOOL}")
    return manifest


class ChatData:
    """One split of a chat DATADIR: examples (rows, or row pairs for DPO) in a keyed shuffle per
    epoch, a pure function of (content, seed, example index), so resume needs only a count."""

    def __init__(self, datadir: Path, manifest: dict, split: str, seed: int):
        self.datadir, self.manifest, self.seed = Path(datadir), manifest, seed
        self.kind, self.seq_len = manifest["kind"], manifest["seq_len"]
        self.rows_per_example = 2 if self.kind == "dpo" else 1
        info = manifest["splits"][split]
        self.ids = self._open(info["ids"], manifest["dtype"])
        self.mask = self._open(info["mask"], "uint8")
        self.examples = info["examples"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]
        self.tokenizer_dir = self.datadir / "tokenizer"
        spec = [self.kind, self.seq_len, info["ids"]["sha256"], info["mask"]["sha256"], split, seed]
        self.key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()
        self.fingerprint = self.key[:16]

    def _open(self, entry: dict, dtype: str) -> np.ndarray:
        path = self.datadir / entry["file"]
        try:
            rows, content = shards.open_shard(path, entry, self.seq_len, dtype)
            shards.verify_shard(path, entry, content)
        except DataError as err:
            raise chat_fix(err) from err
        return rows

    def __len__(self) -> int:
        return self.examples

    def rows(self, examples) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, mask bool) of the examples' rows, [len * rows_per_example, seq_len]."""
        per = self.rows_per_example
        index = (np.asarray(examples, np.int64)[:, None] * per + np.arange(per)).reshape(-1)
        return self.ids[index].astype(np.int64), self.mask[index].astype(bool)

    def order(self, first: int, count: int) -> np.ndarray:
        """Examples of global positions first..first+count-1 of the endless, per-epoch shuffled order."""
        epoch, position = np.divmod(np.arange(first, first + count, dtype=np.int64), self.examples)
        out = np.empty(count, np.int64)
        for e in np.unique(epoch):
            where = epoch == e
            out[where] = permute(position[where].astype(np.uint64), self.examples, round_keys(self.key, int(e)))
        return out

    def describe(self) -> str:
        return f"{self.datadir.name}: {self.examples} {self.kind} examples of <= {self.seq_len} tokens"


def open_chat_data(path, kind: str, split: str = "train", seed: int = 0) -> ChatData:
    """Open and check a chat DATADIR of `kind` (manifest, tokenizer copy, shard hashes)."""
    datadir = Path(path)
    manifest = read_chat_manifest(datadir)
    if manifest["kind"] != kind:
        raise DataError(f"{datadir}: holds {manifest['kind']} data, this run needs {kind}; prepare it with "
                        f"{TOOL} --kind {kind}")
    try:
        check_tokenizer_copy(datadir, manifest)
    except DataError as err:
        raise chat_fix(err) from err
    return ChatData(datadir, manifest, split, seed)
