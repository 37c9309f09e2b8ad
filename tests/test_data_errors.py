"""Bad input: each case gets a clear error (file + fix) or is skipped and counted; nothing partial."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest_data import PRETRAIN, prepare_config, read_manifest, shard_rows, tokenizer_dir

from doge.data import DataError, open_pretrain_data, tokenizer_fingerprint
from doge.data.chunk_plan import ReadOptions
from doge.data.prepare import prepare


def assert_nothing_left(out: Path):
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def run(inputs, out, **overrides):
    return prepare(prepare_config(inputs, out, **overrides), progress_bar=False)


def code_lines(n: int) -> list[str]:
    return (PRETRAIN / "python_edu_thealgorithms.jsonl").read_text().splitlines()[:n]


def test_missing_text_field_names_file_line_and_flag(tmp_path):
    src = tmp_path / "code.jsonl"
    src.write_text("\n".join(code_lines(20)) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"code\.jsonl: line 1: no field 'content' "
                                        r"\(fields: repo, commit, path, license, text\); pass --text-field"):
        run([src], out, read=ReadOptions(text_field="content"))
    assert_nothing_left(out)


def test_missing_field_deep_in_a_file_fails_in_the_worker_and_cleans_up(tmp_path):
    lines = code_lines(60)
    record = json.loads(lines[49])
    lines[49] = json.dumps({"body": record["text"]})
    src = tmp_path / "code.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"code\.jsonl: line 50: no field 'text' \(fields: body\)"):
        run([src], out, chunk_bytes=10_000, workers=2)
    assert_nothing_left(out)


def test_empty_and_whitespace_documents_are_skipped_and_counted(tmp_path, caplog):
    texts = ["first document", "", "   \n\t ", None, "second document", "\r\n"]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with caplog.at_level(logging.WARNING, logger="doge.data.prepare"):
        out = run([src], tmp_path / "out", val_fraction="0")
    source = read_manifest(out)["sources"][0]
    assert (source["documents"], source["skipped_empty"]) == (2, 4)
    assert "skipped 4 empty or whitespace-only documents" in caplog.text and "mixed.jsonl" in caplog.text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    tokens = shard_rows(out, "train").reshape(-1)[: source["tokens"]]
    assert tok.decode(tokens) == "first document</s>second document</s>"


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"good text\n\nbad \xff\xfe bytes\n\nmore good text\n")
    with caplog.at_level(logging.WARNING, logger="doge.data.prepare"):
        out = run([src], tmp_path / "out", val_fraction="0")
    source = read_manifest(out)["sources"][0]
    assert (source["documents"], source["utf8_replaced"]) == (3, 1)
    assert "replaced invalid UTF-8 with U+FFFD in 1 documents" in caplog.text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    text = tok.decode(shard_rows(out, "train").reshape(-1)[: source["tokens"]])
    assert text == "good text</s>bad \ufffd\ufffd bytes</s>more good text</s>"


def test_bom_and_crlf_text_gives_the_same_shards_as_plain_lf(tmp_path):
    text = (PRETRAIN / "tinyshakespeare.txt").read_bytes()[:60_000]
    (tmp_path / "lf.txt").write_bytes(text)
    (tmp_path / "crlf.txt").write_bytes(b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n"))
    lf = run([tmp_path / "lf.txt"], tmp_path / "a")
    crlf = run([tmp_path / "crlf.txt"], tmp_path / "b", chunk_bytes=10_000)
    shards_of = lambda datadir: [p.read_bytes() for p in sorted(datadir.glob("*.arrow"))]  # noqa: E731
    assert shards_of(lf) == shards_of(crlf)
    source = read_manifest(crlf)["sources"][0]
    assert source["bom_stripped"] == 1 and source["crlf_normalized"] == source["documents"] > 100


def test_unsupported_or_missing_inputs(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type"):
        run([tmp_path / "data.csv"], out)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file, folder or glob match"):
        run([tmp_path / "nope.jsonl"], out)
    assert_nothing_left(out)


@pytest.fixture()
def small(tmp_path) -> Path:
    src = tmp_path / "stories.txt"
    src.write_bytes((PRETRAIN / "hh_helpful_dialogues.txt").read_bytes()[:80_000])
    return run([src], tmp_path / "small", val_fraction="0.05", shard_rows=20, chunk_bytes=20_000)


def test_token_ids_beyond_the_models_vocab(small):
    with pytest.raises(DataError, match=r"manifest\.json: tokenizer has 1024 tokens but the model's vocab_size is "
                                        "1000"):
        open_pretrain_data(small, vocab_size=1000)
    first = read_manifest(small)["splits"]["train"]["shards"][0]
    path = small / first["file"]
    data = bytearray(path.read_bytes())
    data[-400:-398] = (65535).to_bytes(2, "little")  # a token of the shard's last row, same size
    path.write_bytes(bytes(data))
    loader = open_pretrain_data(small, seed=0, verify_sha256=False)  # the per-row bound is then the last guard
    with pytest.raises(DataError, match=rf"{first['file']}: row {first['rows'] - 1} holds token id 65535 >= "
                                        "vocab_size 1024"):
        loader.samples(np.arange(loader.sources[0].samples))
    loader = open_pretrain_data(small, seed=0)
    with pytest.raises(DataError, match=rf"{first['file']}: sha256 .* differs from the manifest's"):
        loader.samples(np.arange(loader.sources[0].samples))


def test_truncated_damaged_and_missing_shards(small):
    path = small / read_manifest(small)["splits"]["train"]["shards"][1]["file"]
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    with pytest.raises(DataError, match=rf"{path.name}: {len(good) - 100} bytes but the manifest says {len(good)} "
                                        r"\(truncated or replaced\); re-run prepare.py"):
        open_pretrain_data(small)
    path.write_bytes(b"\x00" * 16 + good[16:])
    with pytest.raises(DataError, match=rf"{path.name}: not a readable Arrow stream .* the shard is corrupted; "
                                        "re-run prepare.py"):
        open_pretrain_data(small)
    path.unlink()
    with pytest.raises(DataError, match=rf"{path.name}: shard listed in the manifest is missing"):
        open_pretrain_data(small)


def test_no_validation_rows_gives_an_empty_val_split_and_a_hint(tmp_path, caplog):
    src = tmp_path / "stories.txt"
    src.write_bytes((PRETRAIN / "hh_helpful_dialogues.txt").read_bytes()[:30_000])
    out = run([src], tmp_path / "noval", val_fraction="0")
    with caplog.at_level(logging.WARNING, logger="doge.data.loader"):
        assert len(open_pretrain_data(out, split="val")) == 0
    assert "no validation rows; re-run prepare.py with --val-fraction > 0" in caplog.text


def test_tokenizer_mismatch_between_data_and_run(small, tmp_path):
    ours = tokenizer_fingerprint(tokenizer_dir())
    assert open_pretrain_data(small, tokenizer_fingerprint=ours).tokenizer_fingerprint == ours
    with pytest.raises(DataError, match=rf"data was tokenized with tokenizer {ours} .* but the run uses "
                                        "0123456789abcdef; "
                                        "train with the DATADIR's tokenizer/ folder or re-run prepare.py"):
        open_pretrain_data(small, tokenizer_fingerprint="0123456789abcdef")
    from doge.data.tokenizer import train_tokenizer

    dialogues = PRETRAIN / "hh_helpful_dialogues.txt"
    other_tok = train_tokenizer([str(dialogues)], tmp_path / "other-tok", vocab_size=600, threads=1)
    other = prepare(prepare_config([dialogues], tmp_path / "other", tokenizer=str(other_tok)), progress_bar=False)
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{path: {small}, weight: 1}}\n  - {{path: {other}, weight: 1}}\n")
    with pytest.raises(DataError, match=r"other/manifest\.json: tokenizer .* differs from .*small/manifest\.json"):
        open_pretrain_data(mix)


def test_unfinished_or_changed_prepare(tmp_path):
    src = tmp_path / "stories.txt"
    src.write_bytes((PRETRAIN / "hh_helpful_dialogues.txt").read_bytes()[:30_000])
    out = tmp_path / "out"
    partial = out.with_name("out.partial")
    partial.mkdir()
    with pytest.raises(DataError, match=r"out/manifest\.json: no manifest; .*out\.partial exists: "
                                        "prepare did not finish"):
        open_pretrain_data(out)
    partial.rmdir()
    run([src], out)
    shutil.copytree(out, partial)
    (partial / "progress.json").write_text(json.dumps({"layout": "from-another-command"}))
    shutil.rmtree(out)
    with pytest.raises(DataError, match="left by an interrupted prepare with different inputs or options"):
        run([src], out, seq_len=128)
    assert not out.exists() and partial.exists()  # someone else's partial work is not ours to delete


def test_a_chat_datadir_given_for_pretraining_points_at_sft_and_dpo(tmp_path):
    from doge.data import shards

    (tmp_path / shards.MANIFEST).write_text(json.dumps({"format": shards.CHAT_FORMAT, "version": 1}))
    with pytest.raises(DataError, match="chat DATADIR .*doge/sft.py or doge/dpo.py"):
        shards.read_manifest(tmp_path)
