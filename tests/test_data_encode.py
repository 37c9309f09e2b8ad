"""Memoised encoding (doge/data/encode.py): the exact ids of the tokenizer, and refused when unsafe."""
import json

import numpy as np
import pytest
from conftest_data import (
    CODE_CORPUS,
    PRETRAIN,
    TEXT_CORPORA,
    prepare_config,
    python_text,
    reference_documents,
    reference_tokens,
    scratch,
    tokenizer_dir,
)

from doge.data import encode
from doge.data.encode import DirectEncoder, MemoEncoder, make_encoder, why_not_memoised

SPACE = "\u2581"
EDGE_TEXTS = [
    "", " ", "   ", "a", " a", "a ", "  leading and trailing  ", "runs   of    spaces and\u00a0no-break",
    "tabs\tand\t\tmore\t ", "new\nlines\n\n\nand \n spaces \n", "\r\x0b\x0c\u3000ideographic\u2003em space",
    "digits 1234567890 3.14159 -1e-10 2026-11-27",
    "emoji \U0001f980\U0001f680 \U0001d518\U0001d52b \u9f98 \u00e9\u00e9 \u2211x",
    "special <s> in </s> text<pad><unk> and <s>", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<s>b <s> c<|im_end|>d </s>", f"literal {SPACE} marks {SPACE}{SPACE} a{SPACE}b {SPACE} ", f" {SPACE}", f"{SPACE} ",
    "x" * 3000, "word " * 2000, "def f(x):\n    return x  # comment\n\n\nclass A:\n\tpass\n",
]


def ids_of(encoder, texts, batch=512):
    """Per-text id lists from an encoder, in batches as prepare calls it."""
    out = []
    for start in range(0, len(texts), batch):
        ids, lengths = encoder.encode(texts[start : start + batch])
        assert ids.dtype == np.uint32 and lengths.sum() == len(ids)
        out += [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])] if len(lengths) else []
    return out


def trained_backend(path=None):
    """The Rust tokenizer of a trained tokenizer folder (the 1024-piece one by default)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str((path or tokenizer_dir()) / "tokenizer.json"))


def rust_ids(backend, texts: list) -> list:
    return [e.ids for e in backend.encode_batch(texts)]


def corpus_documents() -> list:
    return [d for name in sorted(TEXT_CORPORA + [CODE_CORPUS]) for d in reference_documents(PRETRAIN / name)]


def test_memoised_ids_are_the_tokenizers_on_every_document_and_edge_case():
    from transformers import AutoTokenizer

    docs, expected = reference_tokens()  # AutoTokenizer(docs), independent of prepare
    encoder = make_encoder(trained_backend())
    assert isinstance(encoder, MemoEncoder), why_not_memoised(trained_backend())
    assert ids_of(encoder, docs) == expected
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    mixed = EDGE_TEXTS + docs[:300] + EDGE_TEXTS
    assert ids_of(encoder, mixed, batch=37) == tok(mixed)["input_ids"]
    assert ids_of(make_encoder(trained_backend()), EDGE_TEXTS, batch=1) == tok(EDGE_TEXTS)["input_ids"]
    edge_ids = tok(EDGE_TEXTS)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in edge_ids[14]  # special tokens inside text
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in edge_ids[12])  # byte fallback


def test_memoised_ids_with_the_production_vocabulary_and_a_memo_that_overflows(monkeypatch):
    """32768 pieces (long words, whitespace runs) and a memo of 64 words that is forgotten often; the
    tokenizer learns them from the corpora and Python's own documentation and source (~5 MB)."""
    from transformers import AutoTokenizer

    from doge.data.tokenizer import train_tokenizer

    path = scratch() / "tokenizer-32k"
    if not path.exists():
        train_tokenizer([str(PRETRAIN), *map(str, python_text())], path, vocab_size=32768)
    docs = corpus_documents() + [d for p in python_text() for d in reference_documents(p)] + EDGE_TEXTS
    expected = AutoTokenizer.from_pretrained(str(path))(docs)["input_ids"]
    encoder = make_encoder(trained_backend(path))
    assert isinstance(encoder, MemoEncoder) and ids_of(encoder, docs) == expected
    assert len(encoder.index) > 100_000  # natural text: far fewer distinct words than words
    monkeypatch.setattr(encode, "MAX_WORDS", 64)
    small = make_encoder(trained_backend(path))
    for start in range(0, 1000, 8):
        batch = docs[start : start + 8]
        assert ids_of(small, batch) == expected[start : start + 8]
        words = {w for text in batch for w in encode.WORD.findall(text.replace(" ", SPACE))}
        assert len(small.index) <= 64 or small.index.keys() == words


def spec_variant(change):
    """The trained tokenizer with its tokenizer.json spec edited by `change(spec)`."""
    from tokenizers import Tokenizer

    spec = json.loads(trained_backend().to_str())
    change(spec)
    return Tokenizer.from_str(json.dumps(spec))


def add_pieces(spec, pieces, merge):
    """New vocabulary pieces (fresh ids) and a merge that goes first."""
    for piece in pieces:
        ids = [*spec["model"]["vocab"].values(), *(t["id"] for t in spec["added_tokens"])]
        spec["model"]["vocab"][piece] = 1 + max(ids)
    spec["model"]["merges"].insert(0, merge)


VIOLATIONS = {
    "pre-tokenizer": lambda s: s.update(pre_tokenizer={"type": "Whitespace"}),
    "normaliser": lambda s: s.update(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Lowercase"}, s["normalizer"]]}),
    "post-processor": lambda s: s.update(post_processor={
        "type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}),
    "character followed by": lambda s: add_pieces(s, [f"e{SPACE}"], ["e", SPACE]),
    "can build a byte piece": lambda s: add_pieces(s, ["<0x4", "1>"], ["<0x4", "1>"]),
    "added token": lambda s: s["added_tokens"].append(
        {"id": 1 + max(s["model"]["vocab"].values()) + len(s["added_tokens"]), "content": "a b",
         "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}),
    "byte-fallback BPE": lambda s: s["model"].update(byte_fallback=False),
}


@pytest.mark.parametrize("reason", VIOLATIONS)
def test_tokenizers_that_break_the_invariant_keep_the_direct_path(reason):
    variant = spec_variant(VIOLATIONS[reason])
    assert reason in why_not_memoised(variant)
    encoder = make_encoder(variant)
    assert isinstance(encoder, DirectEncoder)
    texts = EDGE_TEXTS + corpus_documents()[:200]
    assert ids_of(encoder, texts) == rust_ids(variant, texts)


def test_the_check_matters_a_piece_across_a_word_start_changes_the_ids():
    """Forcing the memo onto a tokenizer with the piece 'e▁' gives wrong ids, so the refusal is
    what keeps prepare exact (and this test could fail if the check were vacuous)."""
    variant = spec_variant(VIOLATIONS["character followed by"])
    texts = ["see you", "the cat"]  # no word is joined after one ending in "e"
    assert ids_of(MemoEncoder(variant), texts) != rust_ids(variant, texts)
    with pytest.raises(RuntimeError, match="spans two words"):  # joined unseen words: caught
        MemoEncoder(variant).encode(["a the ate ice"])


def test_a_hub_style_byte_level_bpe_keeps_the_direct_path():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    docs = corpus_documents()[:2000]
    backend.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert why_not_memoised(backend)
    assert isinstance(make_encoder(backend), DirectEncoder)
    assert ids_of(make_encoder(backend), docs[:300]) == [e.ids for e in backend.encode_batch(docs[:300])]


def test_prepare_uses_the_memoised_encoder_for_a_trained_tokenizer(monkeypatch):
    from doge.data import prepare as prepare_module

    used = []

    def recording(backend):
        used.append(make_encoder(backend))
        return used[-1]

    monkeypatch.setattr(prepare_module, "make_encoder", recording)
    cfg = prepare_config([PRETRAIN / "tinyshakespeare.txt"], scratch() / "encoder-used")
    prepare_module.prepare(cfg, progress_bar=False)
    assert [type(e) for e in used] == [MemoEncoder]


def test_memoised_ids_with_special_token_strings_read_as_text():
    """prepare's default: the strings of special tokens inside text are text (transformers'
    split_special_tokens), through the same memoised path."""
    from transformers import AutoTokenizer

    backend = trained_backend()
    backend.encode_special_tokens = True
    encoder = make_encoder(backend)
    assert isinstance(encoder, MemoEncoder)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    texts = EDGE_TEXTS + corpus_documents()[:300] + EDGE_TEXTS
    expected = tok(texts, split_special_tokens=True)["input_ids"]
    assert ids_of(encoder, texts, batch=37) == expected
    assert not set(tok.all_special_ids) & {t for ids in expected for t in ids}  # no control token anywhere
    assert expected != tok(texts)["input_ids"]  # where parsing them would have put some
