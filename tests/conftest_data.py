"""Shared helpers for the data tests (a plain module: fixtures live in the test files).

The corpora are the repository's own tests/assets/pretrain files. Expensive artefacts (a
tokenizer, prepared DATADIRs) are built once per test session and cached here.
"""
import atexit
import functools
import json
import shutil
import sysconfig
import tempfile
from pathlib import Path

from conftest import ASSETS

PRETRAIN = ASSETS / "pretrain"
# Three text files (python_doc_topics.txt with CRLF line ends) and one JSON Lines file of code.
TEXT_CORPORA = ["tinyshakespeare.txt", "python_doc_topics.txt", "hh_helpful_dialogues.txt"]
CODE_CORPUS = "python_edu_thealgorithms.jsonl"
VOCAB = 1024
SEQ_LEN = 256
# Small shards and chunks so that the corpora give many of each.
PREPARE_OPTIONS = dict(seq_len=SEQ_LEN, val_fraction="0.01", shard_rows=40, chunk_bytes=20_000)


@functools.lru_cache(maxsize=None)
def scratch() -> Path:
    """One temporary folder per test session, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="doge-data-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=None)
def python_text() -> list[Path]:
    """Text that ships with Python itself, ~5 MB in two files: the documentation topics and the
    stdlib's top-level sources. For the tests that need far more documents and distinct words than
    the assets hold (the 32768-piece tokenizer, the round trip over thousands of documents)."""
    import pydoc_data.topics

    out = scratch() / "python-text"
    out.mkdir(exist_ok=True)
    topics, source = out / "python_doc_topics_all.txt", out / "python_stdlib_source.txt"
    topics.write_text("\n\n".join(pydoc_data.topics.topics.values()), encoding="utf-8")
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    source.write_text("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib), encoding="utf-8")
    return [topics, source]


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> Path:
    """A 1024-token tokenizer trained on all four corpora (under a second)."""
    from doge.data.tokenizer import train_tokenizer

    return train_tokenizer([str(PRETRAIN)], scratch() / "tokenizer", vocab_size=VOCAB, threads=1)


def prepare_config(inputs, output, **overrides):
    from doge.data.prepare import PrepareConfig

    options = {**PREPARE_OPTIONS, "tokenizer": str(tokenizer_dir()), **overrides}
    return PrepareConfig(inputs=[str(i) for i in inputs], output=Path(output), **options)


def prepared_all(workers: int = 1) -> Path:
    """All four corpora in one DATADIR."""
    return _prepared_all(workers)


@functools.lru_cache(maxsize=None)
def _prepared_all(workers: int) -> Path:
    from doge.data.prepare import prepare

    return prepare(prepare_config([PRETRAIN], scratch() / f"all-w{workers}", workers=workers), progress_bar=False)


@functools.lru_cache(maxsize=None)
def prepared_each() -> dict:
    """One DATADIR per corpus (for mixtures), rows of 128 tokens."""
    from doge.data.prepare import prepare

    out = {}
    for name in TEXT_CORPORA + [CODE_CORPUS]:
        cfg = prepare_config([PRETRAIN / name], scratch() / f"each-{name}", seq_len=128, workers=2)
        out[name] = prepare(cfg, progress_bar=False)
    return out


def read_manifest(datadir: Path) -> dict:
    return json.loads((Path(datadir) / "manifest.json").read_text())


def reference_documents(path: Path) -> list[str]:
    """Documents as the README defines them, written independently of doge.data.sources:
    text files split at blank lines, JSON Lines' "text" field; CRLF and CR read as LF."""
    if path.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [t.replace("\r\n", "\n").replace("\r", "\n") for t in texts]
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    docs, current = [], []
    for line in text.split("\n"):
        if line.strip(" \t\r\x0b\x0c"):
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    return docs + ["\n".join(current)] if current else docs


@functools.lru_cache(maxsize=None)
def reference_tokens() -> tuple:
    """(documents, AutoTokenizer ids per document) for all four corpora, in prepare's order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    docs = [d for name in sorted(TEXT_CORPORA + [CODE_CORPUS]) for d in reference_documents(PRETRAIN / name)]
    return docs, tok(docs)["input_ids"]


@functools.lru_cache(maxsize=None)
def shard_rows(datadir: Path, split: str):
    """All rows of a split, in order, read with datasets.Dataset.from_file (cached: do not modify)."""
    import datasets
    import numpy as np

    manifest = read_manifest(datadir)
    arrays = [np.asarray(datasets.Dataset.from_file(str(Path(datadir) / e["file"])).with_format("numpy")["input_ids"])
              for e in manifest["splits"][split]["shards"]]
    return np.concatenate(arrays) if arrays else np.zeros((0, manifest["seq_len"]), dtype=np.int64)


def cli(name: str):
    """A data_tools/ script as a module, so tests call its main(argv) as the command line does."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "data_tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
