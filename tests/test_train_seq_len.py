"""The loader owns seq_len: `--seq-len 64` on rows prepared with 128 tokens cuts every row into two
samples, so each token is trained on exactly once per epoch, and a resume on another world size
continues that order without repeating or skipping a sample.

What the trainer consumed is recorded by the ranks themselves (DOGE_TRACE_SAMPLES) and compared
with the 64-token halves of the rows read straight from the Arrow shards, not through the loader.
"""
import json
import shutil
import sys
from collections import Counter

import pyarrow as pa
import pytest
import train_harness as h

pytestmark = pytest.mark.slow
ROW = 2 * h.SEQ_LEN


def prepared_rows_of_128():
    """About 65 rows of 128 tokens: two epochs fit in the 24-step tiny run (16 samples a step)."""
    tokenizer = h.tokenizer()  # also creates the session's scratch folder
    text = (h.PRETRAIN / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]
    corpus = h.BASE / "seq-len-corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    out = h.BASE / "data-rows-128"
    if not out.exists():
        h.run([sys.executable, "data_tools/prepare.py", "--input", str(corpus), "--tokenizer", str(tokenizer),
               "--seq-len", str(ROW), "--output", str(out), "--val-fraction", "0", "--workers", "1"])
    return out


def halves_of_rows(datadir) -> Counter:
    """Every 64-token half of every training row, read from the shards with pyarrow (a stream's
    last row, padded, is not trained on: only the first tokens // 128 rows count)."""
    manifest = json.loads((datadir / "manifest.json").read_text())
    pieces = Counter()
    for entry in manifest["splits"]["train"]["shards"]:
        with pa.memory_map(str(datadir / entry["file"])) as source:
            table = pa.ipc.open_stream(source).read_all()
        usable = min(entry["rows"], entry["tokens"] // ROW)
        for row in table.column("input_ids").to_pylist()[:usable]:
            assert len(row) == ROW
            pieces[tuple(row[:h.SEQ_LEN])] += 1
            pieces[tuple(row[h.SEQ_LEN:])] += 1
    return pieces


def traced(folder) -> dict[int, tuple]:
    """Global sample index -> tokens, from every rank's trace (a redone step overwrites)."""
    samples = {}
    for path in folder.glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            for offset, row in enumerate(record["rows"]):
                samples[record["first"] + offset] = tuple(row)
    return samples


def test_short_seq_len_trains_every_token_once_per_epoch_across_a_world_size_change():
    data = prepared_rows_of_128()
    pieces = halves_of_rows(data)
    epoch = sum(pieces.values())
    assert 2 * epoch <= 24 * h.GLOBAL_SAMPLES, "the run must cover two whole epochs"

    two_ranks, one_rank = h.BASE / "seq-len-2", h.BASE / "seq-len-1"
    h.run(h.train_cmd(2, two_ranks, data, "--eval-interval", "0"), DOGE_TRACE_SAMPLES=str(two_ranks / "trace"))
    reference = traced(two_ranks / "trace")
    assert sorted(reference) == list(range(24 * h.GLOBAL_SAMPLES))
    assert all(len(s) == h.SEQ_LEN for s in reference.values())
    for e in range(2):
        seen = Counter(reference[i] for i in range(e * epoch, (e + 1) * epoch))
        assert seen == pieces, f"epoch {e}: every half-row exactly once"
    assert h.train_lines(two_ranks)[24]["tokens_seen"] == 24 * h.GLOBAL_SAMPLES * h.SEQ_LEN

    # Resume the 2-rank run's step-8 checkpoint on 1 rank: the same samples follow, none repeated.
    ckpt = two_ranks / "checkpoints" / "step-00000008"
    shutil.copytree(ckpt, one_rank / "checkpoints" / ckpt.name)
    (one_rank / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    done = h.run(h.train_cmd(1, one_rank, data, "--eval-interval", "0"), DOGE_TRACE_SAMPLES=str(one_rank / "trace"))
    assert "resumed from" in done.stdout and "world 1" in done.stdout
    resumed = traced(one_rank / "trace")
    assert sorted(resumed) == list(range(8 * h.GLOBAL_SAMPLES, 24 * h.GLOBAL_SAMPLES))
    assert all(resumed[i] == reference[i] for i in resumed)
