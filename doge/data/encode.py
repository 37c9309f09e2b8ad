"""Batch text -> token ids for prepare, memoised per word where that is provably exact.

The tokenizer train_tokenizer.py makes runs BPE over each whole document (no pre-tokenizer), so
the Rust BPE never reuses work and tokenizing bounds prepare. Yet BPE is local: when no piece a
merge can build spans position p, the text tokenizes as its two sides do separately. Sentencepiece
never learns a piece with a non-space character followed by a space (`▁`), so a document is cut
before each `▁` that follows another character, and each such word is tokenized once per worker
and then looked up (as tiktoken and the Rust BPE cache do for pre-tokenized words).

`make_encoder` takes that path only when `why_not_memoised` finds nothing in the tokenizer that
breaks the argument; any other tokenizer (a hub byte-level BPE, a normaliser that lowercases, a
post-processor that adds BOS) is encoded document by document as before. Both give the ids of
`tokenizer(text)` exactly; tests/test_data_encode.py checks that on every document of the corpora.
"""
import json
import re
from itertools import chain

import numpy as np

SPACE = "\u2581"
WORD = re.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")
CHAR_THEN_SPACE = re.compile(f"[^{SPACE}]{SPACE}")
BYTE_PIECES = frozenset(f"<0x{b:02X}>" for b in range(256))
WORDS_PER_TEXT = 256  # unseen words encoded per string: the Rust per-call cost dominates single words
MAX_WORDS = 1 << 18  # memo bounds per worker (~190 B a word: ~50 MB); it starts afresh when a batch
MAX_CHARS = 1 << 24  # would exceed one (the second caps long words: code, URLs)
PLAIN_BPE = ("dropout", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix")  # all must be off


def make_encoder(backend):
    """The memoised encoder when it is provably exact for `backend` (a tokenizers.Tokenizer, used
    as it is: neither encoder changes it)."""
    return DirectEncoder(backend) if why_not_memoised(backend) else MemoEncoder(backend)


class DirectEncoder:
    """Each text through the Rust tokenizer as a whole."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, texts: list, add_special_tokens: bool = True) -> tuple:
        """texts -> (all their ids concatenated as uint32, ids per text)."""
        ids = [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        return np.fromiter(chain.from_iterable(ids), np.uint32, int(lengths.sum())), lengths


class MemoEncoder:
    """Texts cut into words, each word's ids looked up, unseen words encoded in Rust once.

    Words are cut on the normalised text (space -> `▁`, what the model sees); unseen ones go back
    to Rust with spaces restored, which normalises to the same text. The memo is a dict word ->
    index into flat numpy arrays, so putting a batch together is one vectorised gather.
    """

    def __init__(self, backend):
        self.backend = backend
        self.token_bytes = _token_bytes(backend)
        self._forget()

    def _forget(self) -> None:
        self.index: dict = {}
        self.chars = 0
        self.starts = np.zeros(0, np.int64)  # per word: where its ids start in self.ids
        self.lengths = np.zeros(0, np.int64)
        self.ids = np.zeros(0, np.uint32)

    def encode(self, texts: list, add_special_tokens: bool = True) -> tuple:
        """texts -> (all their ids concatenated as uint32, ids per text). `add_special_tokens`
        changes nothing: only post-processors that add no tokens pass why_not_memoised."""
        words = [WORD.findall(t.replace(" ", SPACE)) for t in texts]
        flat = list(chain.from_iterable(words))
        # Only a text's first word can lack the leading `▁`, and only its last can be all `▁`.
        edges = {w for text_words in words if text_words for w in (text_words[0], text_words[-1])}
        self._learn(set(flat), {w for w in edges if w[0] != SPACE or w[-1] == SPACE})
        keys = np.fromiter(map(self.index.__getitem__, flat), np.int64, len(flat))
        lengths = self.lengths[keys]
        ends = np.cumsum(lengths)
        ids = self.ids[np.repeat(self.starts[keys] - ends + lengths, lengths) + np.arange(int(lengths.sum()))]
        last_word = np.cumsum(np.fromiter(map(len, words), np.int64, len(words)))  # per text, 1-based
        text_ends = np.concatenate([[0], ends])[last_word]
        return ids, np.diff(text_ends, prepend=0)

    def _learn(self, words: set, odd: set) -> None:
        """Encode the unseen ones of `words` and remember them (after forgetting all, if too many).
        Those not in `odd` start with `▁` and end on another character, so they can be joined end
        to end: each join is again a cut that no piece spans. The few odd ones are encoded alone."""
        new = words.difference(self.index)
        if not new:
            return
        chars = sum(map(len, new))
        if len(self.index) + len(new) > MAX_WORDS or self.chars + chars > MAX_CHARS:
            self._forget()
            new, chars = words, sum(map(len, words))
        joinable, alone = list(new.difference(odd)), list(new.intersection(odd))
        texts = ["".join(joinable[i : i + WORDS_PER_TEXT]) for i in range(0, len(joinable), WORDS_PER_TEXT)] + alone
        encodings = self.backend.encode_batch_fast([t.replace(SPACE, " ") for t in texts], add_special_tokens=False)
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.uint32)
        order = joinable + alone
        word_bytes = np.fromiter(map(len, map(str.encode, order)), np.int64, len(order))
        counts = _split_by_bytes(ids, self.token_bytes, word_bytes)
        self.index.update(zip(order, range(len(self.index), len(self.index) + len(order))))
        self.chars += chars
        self.starts = np.concatenate([self.starts, len(self.ids) + np.cumsum(counts) - counts])
        self.lengths = np.concatenate([self.lengths, counts])
        self.ids = np.concatenate([self.ids, ids])


def _split_by_bytes(ids: np.ndarray, token_bytes: np.ndarray, word_bytes: np.ndarray) -> np.ndarray:
    """How many of `ids` belong to each word, from the UTF-8 length each token stands for.
    Also checks that every word ends where a token ends, i.e. that no token spans two words."""
    token_ends = np.cumsum(token_bytes[ids])
    word_ends = np.cumsum(word_bytes)
    cuts = np.searchsorted(token_ends, word_ends, side="right")
    if len(word_ends) and (len(token_ends) != cuts[-1] or not np.array_equal(token_ends[cuts - 1], word_ends)):
        raise RuntimeError("memoised encoding: a token spans two words; why_not_memoised missed a case")
    return np.diff(cuts, prepend=0)


def _token_bytes(backend) -> np.ndarray:
    """UTF-8 length of the text each id stands for (1 for byte-fallback pieces)."""
    vocab = backend.get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values()) + 1, np.int64)
    for piece, i in vocab.items():
        table[i] = 1 if piece in BYTE_PIECES else len(piece.encode())
    return table


def why_not_memoised(backend) -> str:
    """'' when cutting texts before every `▁` that follows another character cannot change the
    ids `backend` gives, else the first reason why not. Reads the live tokenizer's parts rather
    than its JSON: parsing a 32k vocabulary's JSON costs more than the whole check."""
    model, post = backend.model, _state(backend.post_processor)
    bpe = type(model).__name__ == "BPE"
    vocab = backend.get_vocab(with_added_tokens=False)
    checks = [
        (_state(backend.normalizer) == {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
         "the normaliser is not exactly space -> \u2581"),
        (backend.pre_tokenizer is None, "it has a pre-tokenizer"),
        (post is None or (post["type"] == "TemplateProcessing" and [list(x) for x in post["single"]] == [["Sequence"]]),
         "its post-processor adds tokens"),
        (backend.truncation is None and backend.padding is None, "it truncates or pads"),
        (bpe and model.byte_fallback and not any(getattr(model, k) for k in PLAIN_BPE),
         "the model is not a plain byte-fallback BPE"),
        (BYTE_PIECES <= vocab.keys() and SPACE in vocab, "byte pieces or \u2581 are missing"),
        (not any(CHAR_THEN_SPACE.search(piece) for piece in vocab), "a piece has a character followed by \u2581"),
        (not any(b[:i] in vocab and b[i:] in vocab for b in BYTE_PIECES for i in range(1, len(b))),
         "a merge can build a byte piece"),
        (not any(" " in t.content or SPACE in t.content or t.lstrip or t.rstrip or t.single_word
                 for t in backend.get_added_tokens_decoder().values()),
         "an added token has a space or strips/matches whole words"),
    ]
    return next((reason for ok, reason in checks if not ok), "")


def _state(part):
    """A normaliser's or post-processor's own JSON, as a dict (None stays None)."""
    return None if part is None else json.loads(part.__getstate__())
