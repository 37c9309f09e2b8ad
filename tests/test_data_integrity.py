"""Integrity: no sample from bytes the manifest does not describe, the DATADIR's tokenizer copy is
the one the shards were made with, and the data fingerprint follows content, not command lines."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest_data import PRETRAIN, VOCAB, prepare_config, prepared_all, read_manifest

from doge.data import DataError, open_pretrain_data
from doge.data.prepare import prepare
from doge.data.tokenizer import train_tokenizer


@pytest.fixture()
def small(tmp_path) -> Path:
    """A DATADIR of several train and val shards."""
    src = tmp_path / "stories.txt"
    src.write_bytes((PRETRAIN / "hh_helpful_dialogues.txt").read_bytes()[:80_000])
    return prepare(prepare_config([src], tmp_path / "small", val_fraction="0.05", shard_rows=20, chunk_bytes=20_000),
                   progress_bar=False)


def shard_entry(datadir: Path, split: str, index: int) -> dict:
    return read_manifest(datadir)["splits"][split]["shards"][index]


def change_one_token(path: Path) -> np.ndarray:
    """Replace a token of the shard's last row by another valid id (size and Arrow structure intact);
    return that row as it now reads."""
    data = bytearray(path.read_bytes())
    old = int.from_bytes(data[-400:-398], "little")
    data[-400:-398] = ((old + 1) % VOCAB).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    import datasets

    return np.asarray(datasets.Dataset.from_file(str(path)).with_format("numpy")["input_ids"][-1], dtype=np.int64)


def read_every_sample(data, n: int) -> tuple[list, list]:
    """(samples returned, errors raised) reading global samples 0..n-1 one by one."""
    served, errors = [], []
    for i in range(n):
        try:
            served.append(data[i])
        except DataError as exc:
            errors.append(str(exc))
    return served, errors


def test_a_corrupted_shard_never_serves_a_sample(small):
    entry = shard_entry(small, "train", 1)
    changed_row = change_one_token(small / entry["file"])
    data = open_pretrain_data(small, seed=0)  # cheap checks pass: size, schema, token bound
    served, errors = read_every_sample(data, data.sources[0].samples)
    assert len(errors) == entry["rows"] and len(served) == data.sources[0].samples - entry["rows"]
    assert not any(np.array_equal(s, changed_row) for s in served)
    assert errors[0].startswith(f"{small / entry['file']}: sha256 ") and "re-run prepare.py" in errors[0]
    assert "\n" not in errors[0]


def test_a_manifest_with_a_wrong_sha256_serves_nothing_from_that_shard(small):
    manifest = read_manifest(small)
    entry = manifest["splits"]["val"]["shards"][0]
    entry["sha256"] = "0" * 64
    (small / "manifest.json").write_text(json.dumps(manifest))
    val = open_pretrain_data(small, split="val")
    with pytest.raises(DataError, match=rf"{entry['file']}: sha256 .* differs from the manifest's 0000000000000000"):
        val[0]
    train = open_pretrain_data(small, seed=0)
    assert len(train.samples(np.arange(train.sources[0].samples))) == train.sources[0].samples  # other shards fine


def test_a_swapped_tokenizer_copy_is_refused_at_open(small, tmp_path):
    other = train_tokenizer([str(PRETRAIN / "tinyshakespeare.txt")], tmp_path / "other", vocab_size=VOCAB, threads=1)
    ours = read_manifest(small)["tokenizer"]["fingerprint"]
    shutil.rmtree(small / "tokenizer")
    shutil.copytree(other, small / "tokenizer")  # same size, another vocabulary
    for split in ("train", "val"):
        with pytest.raises(DataError, match=rf"small/tokenizer: holds tokenizer \w+, but the shards were tokenized "
                                            rf"with {ours} .*; restore the tokenizer/ folder prepare.py wrote"):
            open_pretrain_data(small, split=split)


def test_an_edited_or_missing_tokenizer_file_is_refused_at_open(small):
    config = small / "tokenizer" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    original = config.read_text()
    config.write_text(json.dumps(dict(settings, eos_token="<pad>")))  # tokenizer.json (the fingerprint) unchanged
    with pytest.raises(DataError, match=r"tokenizer_config\.json: missing or changed since prepare\.py wrote it"):
        open_pretrain_data(small)
    config.write_text(original)
    assert open_pretrain_data(small).tokenizer_dir == small / "tokenizer"
    shutil.rmtree(small / "tokenizer")
    with pytest.raises(DataError, match=r"small/tokenizer: no readable tokenizer\.json .*; restore the tokenizer/"):
        open_pretrain_data(small)


def test_fingerprint_follows_content_seed_and_seq_len_not_the_command(tmp_path):
    one, two = prepared_all(1), prepared_all(2)  # the same data prepared with 1 and 2 workers, in other folders
    a, b = open_pretrain_data(one, seed=0), open_pretrain_data(two, seed=0)
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.samples(np.arange(64)), b.samples(np.arange(64)))
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    manifest = read_manifest(copy)
    manifest["command"] = ["python", "prepare.py", "--workers", "16"]
    manifest["sources"][0]["spec"] = "/elsewhere/corpus"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert open_pretrain_data(copy, seed=0).fingerprint == a.fingerprint
    others = {open_pretrain_data(one, seed=1).fingerprint, open_pretrain_data(one, seed=0, seq_len=128).fingerprint,
              open_pretrain_data(one, seed=0, split="val").fingerprint}
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    others.add(open_pretrain_data(copy, seed=0).fingerprint)
    assert len(others) == 4 and a.fingerprint not in others


def test_fingerprint_follows_mixture_weights(tmp_path):
    path = prepared_all()
    fingerprints = set()
    for weights in ((1, 1), (1, 2)):
        mix = tmp_path / f"mix-{weights[1]}.yaml"
        mix.write_text("sources:\n" + "".join(f"  - {{name: s{i}, path: {path}, weight: {w}}}\n"
                                              for i, w in enumerate(weights)))
        fingerprints.add(open_pretrain_data(mix, seed=0).fingerprint)
    assert len(fingerprints) == 2
