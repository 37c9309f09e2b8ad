"""prepare: real corpora -> Arrow shards; completeness, counts, determinism, crash safety."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import ASSETS
from conftest_data import (
    CODE_CORPUS,
    PRETRAIN,
    SEQ_LEN,
    TEXT_CORPORA,
    prepare_config,
    prepared_all,
    python_text,
    read_manifest,
    reference_documents,
    reference_tokens,
    scratch,
    shard_rows,
    tokenizer_dir,
)

from doge.data import shards
from doge.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def shard_bytes(datadir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(datadir).glob("*.arrow"))}


def stream(datadir: Path) -> np.ndarray:
    """Train and val rows merged back into stream order by the manifest's split rule."""
    manifest = read_manifest(datadir)
    train, val = shard_rows(datadir, "train"), shard_rows(datadir, "val")
    mask = shards.val_mask(0, len(train) + len(val), manifest["val_fraction"], manifest["val_rows"])
    rows = np.empty((len(mask), manifest["seq_len"]), dtype=np.int64)
    rows[mask], rows[~mask] = val, train
    return rows.reshape(-1)


def test_shards_open_with_datasets_and_manifest_counts_match():
    datadir = prepared_all()
    manifest = read_manifest(datadir)
    assert manifest["dtype"] == "uint16" and manifest["seq_len"] == SEQ_LEN
    assert len(manifest["splits"]["train"]["shards"]) > 5 and len(manifest["splits"]["val"]["shards"]) > 1
    for split in ("train", "val"):
        info = manifest["splits"][split]
        rows = shard_rows(datadir, split)
        assert rows.shape == (info["rows"], SEQ_LEN) == (sum(e["rows"] for e in info["shards"]), SEQ_LEN)
        assert info["tokens"] == sum(e["tokens"] for e in info["shards"])
        for entry in info["shards"]:
            assert shards.sha256_file(datadir / entry["file"]) == entry["sha256"]
            assert os.path.getsize(datadir / entry["file"]) == entry["bytes"]
    (source,) = manifest["sources"]
    expected_docs = sum(len(reference_documents(PRETRAIN / name)) for name in TEXT_CORPORA + [CODE_CORPUS])
    assert source["documents"] == expected_docs
    total_tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    assert source["tokens"] == total_tokens
    rows = manifest["splits"]["train"]["rows"] + manifest["splits"]["val"]["rows"]
    assert rows * SEQ_LEN - manifest["pad_tokens"] == total_tokens
    assert source["crlf_normalized"] > 0  # python_doc_topics.txt has CRLF line ends
    assert (datadir / "tokenizer" / "tokenizer.json").is_file()


def test_every_token_of_every_document_present_once_in_order():
    """Reference: AutoTokenizer on independently split documents, EOS appended, concatenated."""
    eos = read_manifest(prepared_all())["tokenizer"]["eos_id"]
    _, ids = reference_tokens()
    expected = np.fromiter((t for doc in ids for t in doc + [eos]), dtype=np.int64)
    datadir = prepared_all()
    manifest = read_manifest(datadir)
    got = stream(datadir)
    assert manifest["pad_tokens"] == len(got) - len(expected) and 0 <= manifest["pad_tokens"] < SEQ_LEN
    assert np.array_equal(got[: len(expected)], expected)
    assert (got[len(expected) :] == manifest["tokenizer"]["pad_id"]).all()


def test_same_bytes_with_one_and_two_workers():
    one, two = prepared_all(1), prepared_all(2)
    assert shard_bytes(one) == shard_bytes(two) and len(shard_bytes(one)) > 10
    strip = lambda m: {k: v for k, v in m.items() if k != "command"}  # noqa: E731
    assert strip(read_manifest(one)) == strip(read_manifest(two))


def test_kill_9_mid_run_then_rerun_gives_identical_bytes_without_redoing_shards():
    """On the corpora and Python's own text (~5 MB): enough work left after two shards to be killed."""
    inputs, options = [PRETRAIN, *python_text()], dict(shard_rows=400, chunk_bytes=200_000)
    out = scratch() / "killed"
    cmd = [sys.executable, str(REPO / "data_tools" / "prepare.py"), "--input", *map(str, inputs), "--tokenizer",
           str(tokenizer_dir()), "--output", str(out), "--seq-len", str(SEQ_LEN), "--val-fraction", "0.01",
           "--shard-rows", str(options["shard_rows"]), "--chunk-mb", str(options["chunk_bytes"] / 2**20),
           "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE)
    partial = out.with_name(out.name + ".partial")
    deadline = time.time() + 240
    committed = []
    while time.time() < deadline and proc.poll() is None:
        progress = partial / "progress.json"
        if progress.is_file() and len(committed := json.loads(progress.read_text())["train"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"prepare finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "DATADIR must not appear before prepare completes"
    for shard in partial.glob("[!.]*.arrow"):  # every visible shard is complete (.tmp-* are being written)
        import datasets

        assert datasets.Dataset.from_file(str(shard)).num_rows > 0
    inodes = {e["file"]: os.stat(partial / e["file"]).st_ino for e in committed}
    mtimes = {e["file"]: os.stat(partial / e["file"]).st_mtime_ns for e in committed}
    prepare(prepare_config(inputs, out, workers=1, **options), progress_bar=False)
    uninterrupted = prepare(prepare_config(inputs, scratch() / "not-killed", workers=2, **options), progress_bar=False)
    assert shard_bytes(out) == shard_bytes(uninterrupted)
    assert {f: os.stat(out / f).st_ino for f in inodes} == inodes
    assert {f: os.stat(out / f).st_mtime_ns for f in mtimes} == mtimes  # finished shards were not rewritten
    assert not partial.exists()


def test_parquet_and_jsonl_inputs_give_the_same_shards(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in (PRETRAIN / CODE_CORPUS).read_text().splitlines()[:60]]
    jsonl = tmp_path / "code.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.table({"text": [r["text"] for r in records], "path": [r["path"] for r in records]}),
                   tmp_path / "code.parquet", row_group_size=10)
    a = prepare(prepare_config([jsonl], tmp_path / "a", chunk_bytes=10_000), progress_bar=False)
    b = prepare(prepare_config([tmp_path / "code.parquet"], tmp_path / "b"), progress_bar=False)
    assert shard_bytes(a) == shard_bytes(b)
    assert read_manifest(b)["sources"][0]["documents"] == 60


def test_chat_fields_render_the_tokenizers_chat_template(tmp_path):
    from transformers import AutoTokenizer

    qa = [json.loads(line) for line in (ASSETS / "sft" / "gsm8k_train.jsonl").read_text().splitlines()[:50]]
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in qa))
    from doge.data.chunk_plan import ReadOptions

    datadir = prepare(prepare_config([src], tmp_path / "chat", val_fraction="0",
                                     read=ReadOptions(chat_fields=("question", "answer"))), progress_bar=False)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    expected = []
    for r in qa:
        messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        expected += tok.apply_chat_template(messages, tokenize=True, return_dict=False) + [tok.eos_token_id]
    got = shard_rows(datadir, "train").reshape(-1)
    assert np.array_equal(got[: len(expected)], expected)
    assert tok.convert_tokens_to_ids("<|im_start|>") in got


def test_hub_spec_reads_a_datasets_folder(tmp_path, monkeypatch):
    """hf:NAME goes through datasets.load_dataset; a local folder is a valid NAME offline."""
    lines = (PRETRAIN / CODE_CORPUS).read_text().splitlines()[:100]
    (tmp_path / "hubdata").mkdir()
    (tmp_path / "hubdata" / "train.jsonl").write_text("\n".join(lines) + "\n")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    hub = prepare(prepare_config([f"hf:{tmp_path / 'hubdata'}"], tmp_path / "hub"), progress_bar=False)
    local = prepare(prepare_config([tmp_path / "hubdata" / "train.jsonl"], tmp_path / "local"), progress_bar=False)
    assert shard_bytes(hub) == shard_bytes(local)


def test_special_token_strings_in_text_are_text_unless_parsing_is_asked_for(tmp_path, caplog):
    from transformers import AutoTokenizer

    from doge.data.chunk_plan import ReadOptions

    texts = ["The tag </s> ends a sequence and <s> starts one.", "plain text", "print('<|im_start|>user')"]
    src = tmp_path / "web.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    for parse in (False, True):
        with caplog.at_level(logging.WARNING, logger="doge.data.prepare"):
            datadir = prepare(prepare_config([src], tmp_path / f"parse-{parse}", val_fraction="0",
                                             read=ReadOptions(parse_special_tokens=parse)), progress_bar=False)
        ids = tok(texts, split_special_tokens=not parse)["input_ids"]
        expected = [t for doc in ids for t in doc + [tok.eos_token_id]]
        assert expected.count(tok.eos_token_id) == 3 + parse  # parsed, the </s> in the text is one more
        assert shard_rows(datadir, "train").reshape(-1)[: len(expected)].tolist() == expected
        manifest = read_manifest(datadir)
        assert manifest["sources"][0]["special_token_strings"] == 3
        assert manifest["options"]["read"]["parse_special_tokens"] is parse
        how = "read as control tokens" if parse else "encoded as plain text; pass --parse-special-tokens"
        assert "found 3 special-token strings" in caplog.text and how in caplog.text
        caplog.clear()


def test_chat_contents_with_special_token_strings_stay_text(tmp_path):
    from transformers import AutoTokenizer

    from doge.data.chunk_plan import ReadOptions

    record = {"q": "What does <|im_end|> mean?", "a": "It ends a turn, as </s> ends a text."}
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(record) + "\n")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def text(s):
        return tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    expected = ([start] + text("user\n" + record["q"]) + [end] + text("\n") + [start] +
                text("assistant\n" + record["a"]) + [end] + text("\n") + [tok.eos_token_id])
    datadir = prepare(prepare_config([src], tmp_path / "chat", val_fraction="0",
                                     read=ReadOptions(chat_fields=("q", "a"))), progress_bar=False)
    assert shard_rows(datadir, "train").reshape(-1)[: len(expected)].tolist() == expected
    assert read_manifest(datadir)["sources"][0]["special_token_strings"] == 2
    parsed = prepare(prepare_config([src], tmp_path / "parsed", val_fraction="0",
                                    read=ReadOptions(chat_fields=("q", "a"), parse_special_tokens=True)),
                     progress_bar=False)
    messages = [{"role": "user", "content": record["q"]}, {"role": "assistant", "content": record["a"]}]
    rendered = tok.apply_chat_template(messages, tokenize=True, return_dict=False) + [tok.eos_token_id]
    assert shard_rows(parsed, "train").reshape(-1)[: len(rendered)].tolist() == rendered
