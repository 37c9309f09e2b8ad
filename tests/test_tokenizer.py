"""train_tokenizer: a transformers fast tokenizer folder, lossless on the real corpora, reproducible."""
import importlib.util
import json
from pathlib import Path

import pytest
from conftest_data import (
    CODE_CORPUS,
    PRETRAIN,
    VOCAB,
    python_text,
    reference_documents,
    reference_tokens,
    tokenizer_dir,
)

from doge.data import tokenizer_fingerprint
from doge.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_autotokenizer_loads_a_fast_tokenizer_with_special_tokens_and_chat_template():
    tok = load(tokenizer_dir())
    assert tok.is_fast and len(tok) == VOCAB
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert len({tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 4
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                                   tokenize=True, return_dict=False)
    assert chat.count(start) == 2 and chat.count(end) == 2
    assert tok.decode(chat) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"


def test_round_trip_on_every_document_of_the_real_corpora():
    """The four corpora it was trained on, and Python's own documentation topics and stdlib source."""
    tok = load(tokenizer_dir())
    docs, ids = reference_tokens()  # tok(docs) on all four corpora
    python_docs = [d for path in python_text() for d in reference_documents(path)]
    docs, ids = docs + python_docs, ids + tok(python_docs)["input_ids"]
    assert tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # adds no BOS/EOS itself
    keep = [i for i, d in enumerate(docs) if "\u2581" not in d]  # U+2581 is the one character shown as a space
    assert len(keep) > 12000 and len(docs) - len(keep) < 5
    decoded = tok.batch_decode([ids[i] for i in keep], skip_special_tokens=False)
    assert [i for i, text in zip(keep, decoded) if text != docs[i]] == []
    assert tok.unk_token_id not in {t for doc in ids for t in doc}


def test_byte_fallback_never_produces_unknown_tokens():
    tok = load(tokenizer_dir())
    text = "emoji \U0001F600, CJK \u65e5\u672c\u8a9e, control \x07, tabs\t\tand  spaces  \n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert "<0xF0>" in tok.convert_ids_to_tokens(ids)


def test_training_is_deterministic_and_fingerprint_follows_behaviour(tmp_path):
    inputs = [str(PRETRAIN / "tinyshakespeare.txt"), str(PRETRAIN / CODE_CORPUS)]
    a = train_tokenizer(inputs, tmp_path / "a", vocab_size=700, threads=2)
    b = train_tokenizer(inputs, tmp_path / "not" / "yet" / "b", vocab_size=700, threads=2)  # parents made
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = load(a)
    tok.save_pretrained(tmp_path / "resaved")
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(a) == tokenizer_fingerprint(tmp_path / "resaved")
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(tokenizer_dir())


def test_cli_reads_a_json_field_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in (PRETRAIN / CODE_CORPUS).read_text().splitlines()[:200]]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in records))
    pq.write_table(pa.table({"body": [r["text"] for r in records]}), tmp_path / "code.parquet")
    spec = importlib.util.spec_from_file_location("train_tokenizer_cli", REPO / "data_tools" / "train_tokenizer.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for name in ("code.jsonl", "code.parquet"):
        out = tmp_path / f"tok-{name}"
        args = ["--input", str(tmp_path / name), "--text-field", "body", "--vocab-size", "500", "--output", str(out)]
        assert cli.main(args) == 0
    made = [(tmp_path / f"tok-code.{kind}" / "tokenizer.json").read_bytes() for kind in ("jsonl", "parquet")]
    assert made[0] == made[1]
    assert cli.main(["--input", str(tmp_path / "code.jsonl"), "--output", str(tmp_path / "x"), "--vocab-size",
                     "500"]) == 2
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".train_tokenizer-*"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
