"""What each prepare worker process runs: one chunk -> its documents' tokens, each followed by EOS.

prepare.py forks the workers with `init_worker` (the encoder, tokenizer and options they share)
and sends them chunks for `tokenize_chunk`. Chat records (`chat_fields`) are rendered with the
tokenizer's chat template: by default the template is cut around the two contents once
(`chat_template_runs`), so its control tokens stay tokens while the contents are always text.
"""
import os
import re
from itertools import chain

import numpy as np

from doge.data.chunk_plan import ReadOptions
from doge.data.errors import DataError
from doge.data.sources import Stats, read_chunk

CHAT_SLOTS = ("\x00prompt\x00", "\x00answer\x00")  # stand-ins for the contents when splitting a chat template
ENCODE_BATCH = 512


def chat_template_runs(tok, special: re.Pattern) -> list:
    """The chat template cut around the two message contents: three pieces, each a list of text
    runs and special-token ids. The template's own control tokens stay tokens, while the contents,
    later put between the pieces, are encoded as text whatever they contain."""
    pieces = re.split("|".join(map(re.escape, CHAT_SLOTS)), _render_chat(tok, CHAT_SLOTS))
    if len(pieces) != 3:
        raise DataError(f"{tok.name_or_path}: the chat template does not show each message's content once; pass "
                        "--parse-special-tokens to tokenize the rendered chat as a whole")
    return [_split_special(piece, special, tok) for piece in pieces]


def _split_special(text: str, special: re.Pattern, tok) -> list:
    """text -> [text run, token id, text run, ...] cut at special-token strings."""
    runs, pos = [], 0
    for match in special.finditer(text):
        runs += [text[pos : match.start()], tok.convert_tokens_to_ids(match.group())]
        pos = match.end()
    return runs + [text[pos:]]


_WORKER: dict = {}  # what init_worker gave this process


def init_worker(encoder, tok, eos: int, opts: ReadOptions, dtype: str, single_thread: bool, special, chat) -> None:
    """One tokenizer thread per worker when there are several workers. Unless special tokens are
    to be parsed, the worker's own (forked) copy of the tokenizer reads their strings as text."""
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encoder.backend.encode_special_tokens = not opts.parse_special_tokens
    _WORKER.update(encoder=encoder, tok=tok, eos=eos, opts=opts, dtype=np.dtype(dtype), special=special, chat=chat)


def tokenize_chunk(chunk):
    """One chunk -> (all its documents' tokens, each followed by EOS, as one array; stats)."""
    stats = Stats()
    docs = list(read_chunk(chunk, _WORKER["opts"], stats))
    texts = chain.from_iterable(docs) if _WORKER["opts"].chat_fields else docs
    stats.special_token_strings = sum(len(_WORKER["special"].findall(t)) for t in texts)
    pieces = []
    for start in range(0, len(docs), ENCODE_BATCH):
        pieces.append(_encode(docs[start : start + ENCODE_BATCH]))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, _WORKER["dtype"])
    stats.tokens = int(tokens.size)
    return tokens, stats


def _encode(docs: list) -> np.ndarray:
    """Tokenize (BOS if the tokenizer adds one), then append EOS to each document that does not
    already end with it."""
    encoder, eos = _WORKER["encoder"], _WORKER["eos"]
    if _WORKER["chat"]:
        ids, lengths = _encode_chat(docs)
    elif _WORKER["opts"].chat_fields:
        ids, lengths = encoder.encode([_render_chat(_WORKER["tok"], d) for d in docs], add_special_tokens=False)
    else:
        ids, lengths = encoder.encode(docs, add_special_tokens=True)
    ends = np.cumsum(lengths)
    has_eos = np.zeros(len(lengths), bool)
    has_eos[lengths > 0] = ids[ends[lengths > 0] - 1] == eos
    return np.insert(ids, ends[~has_eos], eos).astype(_WORKER["dtype"], copy=False)


def _encode_chat(docs: list) -> tuple:
    """Chats with the contents as text: each document is the template's runs with the contents
    put in; adjacent text is joined (as the whole rendered string would be tokenized between its
    control tokens) and all text runs of the batch are encoded in one call."""
    runs = [_join_text(_fill_template(_WORKER["chat"], parts)) for parts in docs]
    texts = [r for doc in runs for r in doc if isinstance(r, str)]
    text_ids, lengths = _WORKER["encoder"].encode(texts, add_special_tokens=False)
    encoded = iter(np.split(text_ids, np.cumsum(lengths)[:-1]))
    pieces = [[next(encoded) if isinstance(r, str) else np.array([r], np.uint32) for r in doc] for doc in runs]
    return np.concatenate([p for doc in pieces for p in doc]), np.array([sum(map(len, doc)) for doc in pieces])


def _fill_template(template: list, parts: tuple) -> list:
    filled = list(template[0])
    for content, after in zip(parts, template[1:]):
        filled += [content, *after]
    return filled


def _join_text(runs: list) -> list:
    joined = []
    for run in runs:
        if isinstance(run, str) and joined and isinstance(joined[-1], str):
            joined[-1] += run
        else:
            joined.append(run)
    return joined


def _render_chat(tok, parts: tuple) -> str:
    """(prompt, answer) -> the tokenizer's chat template text (user turn, assistant turn)."""
    messages = [{"role": "user", "content": parts[0]}, {"role": "assistant", "content": parts[1]}]
    return tok.apply_chat_template(messages, tokenize=False)

