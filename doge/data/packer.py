"""Packing: the ordered token stream cut into rows, routed to train/val, committed shard by shard.

Each commit also records in progress.json where the stream stands, so an interrupted prepare
resumes from the last committed shard (prepare.py reads it back).
"""
from pathlib import Path

import numpy as np

from doge import atomic
from doge.data import shards
from doge.data.sources import STAT_KEYS, Stats

PROGRESS = "progress.json"


class Packer:
    """Cuts the token stream into rows, routes them to train/val, and commits shards in order.

    A commit writes the next train shard plus the val rows that precede its last row, then
    records the stream position after that row; all rows before it are on disk, none after it.
    """

    def __init__(self, work: Path, layout: dict, state: dict):
        self.work, self.state = work, state
        self.seq_len, self.shard_rows = layout["seq_len"], layout["shard_rows"]
        self.dtype = np.dtype(layout["dtype"])
        self.val = (layout["val_fraction"], layout["val_rows"])
        self.pad_id = layout["tokenizer"]["pad_id"]
        self.first_row = state["next_row"]  # global index of the first buffered row
        self.rows: list = []
        self.leftover = np.zeros(0, self.dtype)
        self.skip = state["offset"]  # tokens of the first chunk already committed
        self.fed: list = []  # (chunk index, token start, length, source, stats) not yet committed past
        self.token_pos = state["chunk_token_start"]

    def buffered_rows(self) -> int:
        return sum(len(r) for r in self.rows)

    def feed(self, index: int, source: int, tokens: np.ndarray, stats: Stats) -> None:
        self.fed.append((index, self.token_pos, len(tokens), source, stats))
        self.token_pos += len(tokens)
        tokens, self.skip = tokens[self.skip :], 0
        stream = np.concatenate([self.leftover, tokens])
        n = len(stream) // self.seq_len
        self.rows.append(stream[: n * self.seq_len].reshape(n, self.seq_len))
        self.leftover = stream[n * self.seq_len :].copy()
        while self._train_buffered() >= self.shard_rows:
            self._commit(final=False)

    def finish(self) -> None:
        """Pad the last partial row, commit everything left, note the padding."""
        if len(self.leftover):
            row = np.full((1, self.seq_len), self.pad_id, self.dtype)
            row[0, : len(self.leftover)] = self.leftover
            self.state["pad_tokens"] = self.seq_len - len(self.leftover)
            self.rows.append(row)
            self.leftover = self.leftover[:0]
        self._commit(final=True)

    def _mask(self, n: int) -> np.ndarray:
        return shards.val_mask(self.first_row, n, *self.val)

    def _train_buffered(self) -> int:
        n = self.buffered_rows()
        return n - int(self._mask(n).sum())

    def _commit(self, final: bool) -> None:
        rows = np.concatenate(self.rows) if self.rows else np.zeros((0, self.seq_len), self.dtype)
        mask = self._mask(len(rows))
        cut = len(rows) if final else int(np.flatnonzero(~mask)[self.shard_rows - 1]) + 1
        padded_split = None
        if final and cut and "pad_tokens" in self.state:
            padded_split = "val" if mask[cut - 1] else "train"
        for split, selected in (("train", rows[:cut][~mask[:cut]]), ("val", rows[:cut][mask[:cut]])):
            if len(selected):
                self._write(split, selected, padded=split == padded_split)
        self.rows = [rows[cut:]]
        self.first_row += cut
        self._record_position()

    def _write(self, split: str, rows: np.ndarray, padded: bool) -> None:
        tokens = rows.size - (self.state.get("pad_tokens", 0) if padded else 0)
        name = shards.shard_name(split, len(self.state[split]))
        self.state[split].append(shards.write_shard(self.work, name, rows, tokens))

    def _record_position(self) -> None:
        """Persist where the first uncommitted row starts: chunk index, offset, stats before it."""
        position = self.first_row * self.seq_len
        while self.fed and self.fed[0][1] + self.fed[0][2] <= position:
            index, start, length, source, stats = self.fed.pop(0)
            self._add_stats(source, stats)
            self.state.update(chunk=index + 1, chunk_token_start=start + length, offset=0)
        if self.fed:
            index, start = self.fed[0][0], self.fed[0][1]
            self.state.update(chunk=index, chunk_token_start=start, offset=position - start)
        self.state["next_row"] = self.first_row
        atomic.write_json(self.work / PROGRESS, self.state)

    def _add_stats(self, source: int, stats: Stats) -> None:
        total = self.state["sources"].setdefault(str(source), dict.fromkeys(STAT_KEYS, 0))
        for key, value in stats.as_dict().items():
            total[key] += value

