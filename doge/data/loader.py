"""What the trainer reads: memory-mapped shards in a global order that is a pure function of
(manifests, mixture weights, seed, sample index).

Sample i of the infinite training order: the mixture schedule names its source s and the k-th
sample of s; k = epoch * N_s + p, and the sample is row permute(p) of s under a key made from
(seed, s's manifest, epoch), so every epoch is a fresh shuffle. Nothing depends on the world
size, so the only resume state is the number of samples consumed. Rows longer than the requested
seq_len serve several samples: a row of L tokens gives L // seq_len consecutive pieces.
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from doge.data import shards
from doge.data.errors import DataError
from doge.data.mixture import Schedule, integer_weights, read_mixture
from doge.data.permutation import permute, round_keys
from doge.data.tokenizer_copy import check_tokenizer_copy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochEvent:
    """Global sample `sample` is the first of `source`'s epoch `epoch` (epoch 0 is the start)."""

    sample: int
    source: str
    epoch: int


class SplitSource:
    """One DATADIR's split as a flat list of seq_len samples backed by memory maps.

    Each shard's sha256 is checked against the manifest the first time a sample is read from it
    (once per process; 0.84 s per GB on one core, measured by benchmarks/data_prep.py), so no
    sample ever comes from a shard whose bytes differ, and opening stays instant however large
    the data.
    """

    def __init__(self, name: str, datadir: Path, manifest: dict, split: str, seq_len: int, bound: int, verify: bool):
        self.name, self.datadir, self.manifest = name, Path(datadir), manifest
        self.seq_len, self.bound = seq_len, bound
        self.row_len = manifest["seq_len"]
        self.per_row = self.row_len // seq_len
        self.entries = manifest["splits"][split]["shards"]
        opened = [shards.open_shard(self.datadir / e["file"], e, self.row_len, manifest["dtype"]) for e in self.entries]
        self.arrays = [rows for rows, _ in opened]
        self.unverified = {i: content for i, (_, content) in enumerate(opened)} if verify else {}
        usable = [shards.full_rows(e, self.row_len) for e in self.entries]
        self.row_starts = np.concatenate([[0], np.cumsum(usable)]).astype(np.int64)
        self.samples = int(self.row_starts[-1]) * self.per_row
        self.key = shards.content_key(manifest, split)

    def read(self, sample: int) -> np.ndarray:
        """The sample-th piece: row sample // per_row, piece sample % per_row."""
        row, piece = divmod(int(sample), self.per_row)
        shard = int(np.searchsorted(self.row_starts, row, side="right")) - 1
        local = row - int(self.row_starts[shard])
        content = self.unverified.get(shard)
        if content is not None:
            shards.verify_shard(self.datadir / self.entries[shard]["file"], self.entries[shard], content)
            self.unverified.pop(shard, None)  # pop: another thread may have checked it meanwhile
        tokens = self.arrays[shard][local, piece * self.seq_len : (piece + 1) * self.seq_len]
        if int(tokens.max()) >= self.bound:
            path = self.datadir / self.entries[shard]["file"]
            raise DataError(
                f"{path}: row {local} holds token id {int(tokens.max())} >= vocab_size {self.bound}; the shard is "
                "corrupted or was prepared with another tokenizer; re-run prepare.py with the model's tokenizer"
            )
        return tokens.astype(np.int64)


class _Split:
    """What both splits carry: their sources and the data's identity (built by `open_pretrain_data`)."""

    def __init__(self, sources: list[SplitSource], info: dict):
        self.sources = sources
        self.seq_len, self.vocab_size = info["seq_len"], info["vocab_size"]
        self.tokenizer_fingerprint, self.tokenizer_dir = info["tokenizer_fingerprint"], info["tokenizer_dir"]
        self.eos_id = info["eos_id"]  # the token that ends each document packed in a row
        self.fingerprint = info["fingerprint"]


class PretrainData(_Split):
    """The infinite, shuffled, mixed training order (see module docstring)."""

    def __init__(self, sources: list[SplitSource], weights: list, seed: int, info: dict):
        super().__init__(sources, info)
        self.seed, self.weights = seed, weights
        self.schedule = Schedule(integer_weights(weights))
        for source in sources:
            if source.samples == 0:
                raise DataError(f"{source.datadir}: train split has no full row of {source.row_len} tokens; "
                                "prepare more text")

    def __getitem__(self, index: int) -> np.ndarray:
        return self.samples(np.array([index]))[0]

    def samples(self, indices) -> np.ndarray:
        """int64 array [len(indices), seq_len] of global samples (vectorised over the schedule)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and indices.min() < 0:
            raise IndexError("sample indices start at 0")
        out = np.empty((len(indices), self.seq_len), dtype=np.int64)
        source_of, k = self.schedule.locate(indices)
        for s, source in enumerate(self.sources):
            where = np.flatnonzero(source_of == s)
            if not where.size:
                continue
            epoch, position = np.divmod(k[where], source.samples)
            for e in np.unique(epoch):
                chosen = where[epoch == e]
                keys = round_keys(self.seed, source.key, int(e))
                rows = permute(position[epoch == e].astype(np.uint64), source.samples, keys)
                for slot, row in zip(chosen, rows):
                    out[slot] = source.read(int(row))
        return out

    def rank_batch(self, start: int, global_batch: int, rank: int, world: int):
        """Rank `rank`'s contiguous slice of global batch [start, start + global_batch)."""
        import torch

        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        per_rank = global_batch // world
        first = start + rank * per_rank
        return torch.from_numpy(self.samples(np.arange(first, first + per_rank)))

    def epoch_events(self, start: int, stop: int) -> list[EpochEvent]:
        """Sources that begin a new epoch (reshuffled) at a global sample in [start, stop)."""
        events = []
        for s, source in enumerate(self.sources):
            first_k = self.schedule.count_before(s, start)
            last_k = self.schedule.count_before(s, stop)
            epoch = -(-first_k // source.samples)
            while epoch * source.samples < last_k:
                if epoch > 0:
                    events.append(EpochEvent(self.schedule.global_index(s, epoch * source.samples), source.name, epoch))
                epoch += 1
        return sorted(events, key=lambda e: e.sample)

    def describe(self) -> str:
        parts = [f"{s.name}: {s.samples} samples, weight {w}" for s, w in zip(self.sources, self.weights)]
        return f"{len(self.sources)} source(s), seq_len {self.seq_len}, seed {self.seed}: " + "; ".join(parts)


class ValData(_Split):
    """The held-out rows of every source, in stored order (finite, unshuffled; may be empty)."""

    def __init__(self, sources: list[SplitSource], info: dict):
        super().__init__(sources, info)
        self.starts = np.concatenate([[0], np.cumsum([s.samples for s in sources])]).astype(np.int64)
        if self.starts[-1] == 0:  # allowed (a run may skip validation), but worth a line in the log
            names = ", ".join(str(s.datadir) for s in sources)
            log.warning("%s: no validation rows; re-run prepare.py with --val-fraction > 0 to get some", names)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"val sample {index} outside [0, {len(self)})")
        s = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.sources[s].read(index - int(self.starts[s]))


def open_pretrain_data(path, *, seed=0, split="train", tokenizer_fingerprint=None, vocab_size=None,
                       seq_len=None, verify_sha256=True):
    """Open a prepared DATADIR or a mixture YAML, validating everything cheap up front, including
    each source's tokenizer/ copy against its manifest.

    seq_len defaults to the rows' length; a shorter one cuts each row into row_len // seq_len
    samples (tokens past the last full piece are not used). With verify_sha256 (the default) every
    shard's content is checked on its first use (see SplitSource). Raises DataError naming the
    file and the fix on any mismatch.
    """
    if split not in shards.SPLITS:
        raise ValueError(f"split must be one of {shards.SPLITS}, not {split!r}")
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        entries = read_mixture(path)
    else:
        entries = [{"name": path.name, "path": path, "weight": 1}]
    manifests = [shards.read_manifest(e["path"]) for e in entries]
    seq_len = _check_compatible(entries, manifests, tokenizer_fingerprint, vocab_size, seq_len)
    for entry, manifest in zip(entries, manifests):
        check_tokenizer_copy(Path(entry["path"]), manifest)
    bound = vocab_size if vocab_size is not None else manifests[0]["tokenizer"]["vocab_size"]
    sources = [SplitSource(e["name"], e["path"], m, split, seq_len, bound, verify_sha256)
               for e, m in zip(entries, manifests)]
    info = {
        "seq_len": seq_len,
        "tokenizer_fingerprint": manifests[0]["tokenizer"]["fingerprint"],
        "vocab_size": manifests[0]["tokenizer"]["vocab_size"],
        "eos_id": manifests[0]["tokenizer"]["eos_id"],
        "tokenizer_dir": Path(entries[0]["path"]) / "tokenizer",
        "fingerprint": _fingerprint(sources, [e["weight"] for e in entries], seed, seq_len, split),
    }
    if split == "val":
        return ValData(sources, info)
    data = PretrainData(sources, [e["weight"] for e in entries], seed, info)
    log.info("training data %s", data.describe())
    return data


def _check_compatible(entries, manifests, tokenizer_fingerprint, vocab_size, seq_len) -> int:
    first = entries[0]["path"] / shards.MANIFEST
    fingerprint = manifests[0]["tokenizer"]["fingerprint"]
    for entry, manifest in zip(entries, manifests):
        where = entry["path"] / shards.MANIFEST
        found = manifest["tokenizer"]["fingerprint"]
        if found != fingerprint:
            raise DataError(f"{where}: tokenizer {found} differs from {first}'s {fingerprint}; prepare every source "
                            "with one tokenizer")
        if tokenizer_fingerprint is not None and found != tokenizer_fingerprint:
            raise DataError(
                f"{where}: data was tokenized with tokenizer {found} ({manifest['tokenizer']['name_or_path']}) but the "
                f"run uses {tokenizer_fingerprint}; train with the DATADIR's tokenizer/ folder or re-run prepare.py "
                "with the run's tokenizer"
            )
        if seq_len is not None and seq_len > manifest["seq_len"]:
            raise DataError(f"{where}: rows hold {manifest['seq_len']} tokens, fewer than seq_len {seq_len}; re-run "
                            f"prepare.py with --seq-len {seq_len} or train with seq_len <= {manifest['seq_len']}")
        if vocab_size is not None:
            _check_vocab(where, manifest, vocab_size)
    row_len = min(m["seq_len"] for m in manifests)
    seq_len = seq_len or row_len
    for entry, manifest in zip(entries, manifests):
        if manifest["seq_len"] % seq_len:
            log.warning("%s: rows of %d tokens, seq_len %d: the last %d tokens of each row are not used",
                        entry["path"], manifest["seq_len"], seq_len, manifest["seq_len"] % seq_len)
    return seq_len


def _check_vocab(where: Path, manifest: dict, vocab_size: int) -> None:
    tokenizer_vocab = manifest["tokenizer"]["vocab_size"]
    if tokenizer_vocab > vocab_size:
        raise DataError(f"{where}: tokenizer has {tokenizer_vocab} tokens but the model's vocab_size is {vocab_size}; "
                        f"set vocab_size >= {tokenizer_vocab} or re-run prepare.py with the model's tokenizer")
    for split in shards.SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            if entry["max_token_id"] >= vocab_size:
                raise DataError(f"{where.parent / entry['file']}: holds token id {entry['max_token_id']} >= vocab_size "
                                f"{vocab_size}; re-run prepare.py with the model's tokenizer")


def _fingerprint(sources: list[SplitSource], weights: list, seed: int, seq_len: int, split: str) -> str:
    spec = {"sources": [[s.key, str(w)] for s, w in zip(sources, weights)], "seed": seed, "seq_len": seq_len,
            "split": split}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
