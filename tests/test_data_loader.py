"""The loader: global order independent of world size, resume by sample count, mixtures, epochs."""
import numpy as np
import pytest
import torch
from conftest_data import (
    CODE_CORPUS,
    SEQ_LEN,
    TEXT_CORPORA,
    prepared_all,
    prepared_each,
    read_manifest,
    shard_rows,
)

from doge.data import DataError, open_pretrain_data
from doge.data.mixture import integer_weights, max_window_error

GLOBAL_BATCH, STEPS = 12, 6


def read_run(data, start: int, steps: int, world: int) -> np.ndarray:
    """What `world` ranks read over `steps` steps, concatenated step by step, rank by rank."""
    out = []
    for step in range(steps):
        for rank in range(world):
            batch = data.rank_batch(start + step * GLOBAL_BATCH, GLOBAL_BATCH, rank, world)
            assert batch.dtype == torch.int64 and batch.shape == (GLOBAL_BATCH // world, data.seq_len)
            out.append(batch.numpy())
    return np.concatenate(out)


def test_ranks_of_any_world_size_read_the_same_sequence():
    data = open_pretrain_data(prepared_all(), seed=3)
    reference = np.stack([data[i] for i in range(GLOBAL_BATCH * STEPS)])
    for world in (1, 2, 3):
        assert np.array_equal(read_run(data, 0, STEPS, world), reference)
    rows = {r.tobytes() for r in reference}
    assert len(rows) == len(reference)  # a shuffle within an epoch never repeats a row


def test_resume_on_another_world_size_continues_the_sequence():
    path = prepared_all()
    uninterrupted = read_run(open_pretrain_data(path, seed=5), 0, STEPS, 2)
    consumed = 2 * GLOBAL_BATCH  # the only resume state
    first = read_run(open_pretrain_data(path, seed=5), 0, 2, 2)
    for world in (1, 3):
        resumed = read_run(open_pretrain_data(path, seed=5), consumed, STEPS - 2, world)
        assert np.array_equal(np.concatenate([first, resumed]), uninterrupted)


def test_order_is_a_function_of_data_weights_and_seed():
    path = prepared_all()
    a, b, c = (open_pretrain_data(path, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.rank_batch(100, 8, 0, 1), b.rank_batch(100, 8, 0, 1))
    assert not np.array_equal(a.rank_batch(100, 8, 0, 1), c.rank_batch(100, 8, 0, 1))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    with pytest.raises(ValueError, match="not divisible"):
        a.rank_batch(0, 10, 0, 3)


def test_samples_are_rows_of_the_train_shards_and_epochs_reshuffle():
    path = prepared_each()["hh_helpful_dialogues.txt"]
    data = open_pretrain_data(path, seed=0)
    n = data.sources[0].samples
    train = shard_rows(path, "train")
    padded = read_manifest(path)["splits"]["train"]["tokens"] < len(train) * 128
    assert n == len(train) - padded  # the padded last row is never served
    epoch0, epoch1 = data.samples(np.arange(n)), data.samples(np.arange(n, 2 * n))
    as_set = lambda rows: sorted(r.tobytes() for r in rows)  # noqa: E731
    assert as_set(epoch0) == as_set(epoch1) == as_set(train[:n].astype(np.int64))
    assert not np.array_equal(epoch0, epoch1)
    events = data.epoch_events(0, 2 * n + 1)
    assert [(e.sample, e.epoch) for e in events] == [(n, 1), (2 * n, 2)]
    assert data.epoch_events(n + 1, 2 * n) == []


def write_mixture(tmp_path, weights) -> str:
    lines = ["sources:"]
    for name, weight in zip(TEXT_CORPORA + [CODE_CORPUS], weights):
        lines += [f"  - name: {name}", f"    path: {prepared_each()[name]}", f"    weight: {weight}"]
    path = tmp_path / "mix.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mixture_share_is_within_one_sample_in_every_window(tmp_path):
    weights = [70, 20, 5, 5]
    data = open_pretrain_data(write_mixture(tmp_path, weights), seed=0)
    owners = {}
    for s, name in enumerate(TEXT_CORPORA + [CODE_CORPUS]):
        for row in shard_rows(prepared_each()[name], "train").astype(np.int64):
            owners.setdefault(row.tobytes(), set()).add(s)
    total = 2000
    source = np.array([min(owners[r.tobytes()]) for r in data.samples(np.arange(total))])
    share = np.array(weights) / sum(weights)
    for s in range(4):
        prefix = np.concatenate([[0], np.cumsum(source == s)])
        for n in range(1, 201):
            counts = prefix[n:] - prefix[:-n]
            assert np.abs(counts - n * share[s]).max() <= 1 + 1e-9, (s, n)
        assert ((prefix[20:] - prefix[:-20])[::20] == weights[s] // 5).all()  # exact over each period
    assert max_window_error(integer_weights(weights), data.schedule.slots) == 1.0


def test_mixture_reports_when_a_source_starts_a_new_epoch(tmp_path):
    data = open_pretrain_data(write_mixture(tmp_path, [1, 1, 1, 1]), seed=0)
    smallest = min(range(4), key=lambda s: data.sources[s].samples)
    n = data.sources[smallest].samples
    events = [e for e in data.epoch_events(0, 4 * n + 4) if e.source == data.sources[smallest].name]
    assert events and events[0].epoch == 1
    source, draw = data.schedule.locate(np.arange(events[0].sample + 1))
    assert draw[-1] == n and source[-1] == smallest  # the (n+1)-th draw from that source
    assert (source[:-1] == smallest).sum() == n  # ... and not one sample later or earlier


def test_shorter_seq_len_cuts_rows_and_longer_is_refused():
    path = prepared_all()
    full = open_pretrain_data(path, seed=0)
    half = open_pretrain_data(path, seed=0, seq_len=SEQ_LEN // 2)
    assert half.seq_len == SEQ_LEN // 2 and half.sources[0].samples == 2 * full.sources[0].samples
    rows = {r.tobytes() for r in shard_rows(path, "train").astype(np.int64)}
    pieces = {p.tobytes() for r in rows for p in np.frombuffer(r, dtype=np.int64).reshape(2, -1)}
    assert all(half[i].tobytes() in pieces for i in range(50))
    with pytest.raises(DataError, match=f"re-run prepare.py with --seq-len {2 * SEQ_LEN}"):
        open_pretrain_data(path, seq_len=2 * SEQ_LEN)


def test_val_split_is_the_held_out_rows_in_order():
    path = prepared_all()
    val = open_pretrain_data(path, split="val")
    rows = shard_rows(path, "val").astype(np.int64)
    manifest = read_manifest(path)
    assert len(val) == len(rows) - (manifest["splits"]["val"]["tokens"] < len(rows) * SEQ_LEN)
    assert all(np.array_equal(val[i], rows[i]) for i in range(len(val)))
    assert val.tokenizer_fingerprint == manifest["tokenizer"]["fingerprint"] and val.tokenizer_dir == path / "tokenizer"
    with pytest.raises(IndexError):
        val[len(val)]
    train_rows = {r.tobytes() for r in shard_rows(path, "train").astype(np.int64)}
    assert not any(val[i].tobytes() in train_rows for i in range(len(val)))


def test_loader_throughput_is_reasonable():
    """Not a benchmark (see benchmarks/data_prep.py); guards against a pathological slowdown."""
    import time

    data = open_pretrain_data(prepared_all(), seed=0)
    start = time.perf_counter()
    for step in range(50):
        data.rank_batch(step * 64, 64, 0, 1)
    rate = 50 * 64 / (time.perf_counter() - start)
    assert rate > 2000, f"{rate:.0f} samples/s"


def test_shipped_smollm_mixture_is_70_20_5_5_and_exact_per_window():
    from pathlib import Path

    from doge.data.mixture import Schedule, read_mixture

    yaml_path = Path(__file__).resolve().parents[1] / "data_tools" / "mixtures" / "smollm-corpus.yaml"
    sources = read_mixture(yaml_path)
    assert [(s["name"], s["weight"]) for s in sources] == [
        ("fineweb-edu-dedup", 70), ("cosmopedia-v2", 20), ("python-edu", 5), ("finemath-4plus", 5)]
    assert all(s["path"].parent == sources[0]["path"].parent for s in sources)
    weights = integer_weights([s["weight"] for s in sources])
    assert weights == [14, 4, 1, 1] and max_window_error(weights, Schedule(weights).slots) <= 1.0
    if not sources[0]["path"].exists():
        with pytest.raises(DataError, match="fineweb-edu-dedup/manifest.json: no manifest"):
            open_pretrain_data(yaml_path)
