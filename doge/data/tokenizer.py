"""Train a sentencepiece BPE tokenizer and save it as a `transformers` fast tokenizer folder.

sentencepiece learns the vocabulary and merges (byte fallback, so nothing is ever unknown);
the `tokenizers` library then runs them: spaces shown as U+2581 and nothing else normalised, so
decode(encode(text)) == text for any text without a literal U+2581. The fingerprint identifies what
a tokenizer does, so data prepared with one tokenizer cannot silently be trained with another.
`load_tokenizer` opens any fast tokenizer for the data writers; `pad_id` and `special_pattern` are
what both of them (pre-training and chat) read off it.
"""
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from doge import atomic
from doge.data.chunk_plan import ReadOptions
from doge.data.errors import DataError, from_os_error
from doge.data.sources import iter_documents

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# ChatML, as SmolLM uses; roles are plain text after <|im_start|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_SENTENCE_BYTES = 8192
SPM_OPTIONS = dict(  # byte-fallback BPE on the text exactly as given (see the module docstring)
    model_type="bpe", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
    max_sentence_length=MAX_SENTENCE_BYTES, shuffle_input_sentence=True, character_coverage=0.9995,
    unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
)
BYTE_PIECES = 256
MIN_VOCAB = BYTE_PIECES + len(SPECIAL_TOKENS) + len(CHAT_TOKENS) + 1  # and at least one character


def train_tokenizer(
    inputs: list[str],
    output: Path,
    vocab_size: int = 32768,
    opts: ReadOptions = ReadOptions(),
    max_sentences: int = 0,
    seed: int = 0,
    threads: int = 0,
) -> Path:
    """Train on the documents of `inputs` and write a tokenizer folder to `output` atomically."""
    output = Path(output)
    try:
        return _train(inputs, output, vocab_size, opts, max_sentences, seed, threads)
    except OSError as exc:  # a full disk, a read-only or vanished location
        raise from_os_error(exc, output) from exc


def _train(inputs: list[str], output: Path, vocab_size: int, opts: ReadOptions, max_sentences: int, seed: int,
           threads: int) -> Path:
    import sentencepiece as spm
    from tqdm import tqdm

    if output.exists():
        raise DataError(f"{output} already exists; remove it or pick another --output")
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB} ({BYTE_PIECES} byte pieces, "
                        f"{len(SPECIAL_TOKENS)} special and {len(CHAT_TOKENS)} chat tokens, plus one per distinct "
                        "character); Doge uses 32768")
    output.parent.mkdir(parents=True, exist_ok=True)  # the staging folder lives beside the output
    with tempfile.TemporaryDirectory(prefix=".train_tokenizer-", dir=output.parent) as tmp:
        spm.set_random_generator_seed(seed)
        docs = tqdm(iter_documents(inputs, opts), desc="documents", unit=" docs", mininterval=1.0)
        input_errors = []
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_kept_errors(_sentences(docs), input_errors),
                model_prefix=os.path.join(tmp, "spm"),
                vocab_size=vocab_size - len(CHAT_TOKENS),
                input_sentence_size=max_sentences,
                num_threads=threads or os.cpu_count() or 1,
                **SPM_OPTIONS,
            )
        except RuntimeError as exc:
            raise (input_errors[0] if input_errors else _training_error(exc, inputs, vocab_size)) from exc
        staged = atomic.fresh_staging_dir(output)
        _to_transformers(Path(tmp) / "spm.model").save_pretrained(staged)
        if output.exists():
            raise DataError(f"{output} appeared while training; remove it or pick another --output")
        atomic.publish_dir(staged, output)
    return output


def _kept_errors(sentences, errors: list):
    """Pass sentences on; keep a DataError from reading the input, which sentencepiece would bury in
    its own error text, so the caller can raise it as it is."""
    try:
        yield from sentences
    except DataError as exc:
        errors.append(exc)
        raise


def _training_error(exc: RuntimeError, inputs: list, vocab_size: int) -> DataError:
    """sentencepiece's failure as advice: its checks on the vocabulary size, in our flag's terms."""
    text = str(exc)
    if chars := re.search(r"smaller than required_chars\. \d+ vs (\d+)", text):
        needed = int(chars.group(1)) + len(CHAT_TOKENS)
        distinct = needed - MIN_VOCAB + 1
        return DataError(f"--vocab-size {vocab_size} is too small for the {distinct} distinct characters of the text; "
                         f"pass --vocab-size {needed} or more")
    if most := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", text):
        return DataError(f"--vocab-size {vocab_size} is more than this text supports "
                         f"({int(most.group(1)) + len(CHAT_TOKENS)}); pass a smaller --vocab-size or more text")
    return DataError(f"sentencepiece training on {', '.join(inputs)} failed: {text.splitlines()[0]}")


def _sentences(docs):
    """Documents cut at line ends into pieces sentencepiece accepts (it drops longer ones)."""
    for doc in docs:
        if len(doc) * 4 <= MAX_SENTENCE_BYTES:
            yield doc
            continue
        piece = ""
        for line in doc.splitlines(keepends=True):
            if piece and len((piece + line).encode()) > MAX_SENTENCE_BYTES:
                yield piece
                piece = ""
            piece += line[: MAX_SENTENCE_BYTES // 4]
        if piece:
            yield piece


def _to_transformers(model_file: Path):
    """sentencepiece model -> transformers fast tokenizer with the chat tokens and template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(str(model_file)).extract(models.BPE)
    model = models.BPE(vocab=extracted["vocab"], merges=extracted["merges"], byte_fallback=True, fuse_unk=True)
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    # No pre-tokenizer: sentencepiece never learned a merge across a word start, so BPE over the
    # whole text gives the per-word result, faster (measured: ~1.7x) than splitting first.
    # prepare memoises per word on the same fact (doge/data/encode.py checks it on each tokenizer).
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS.values()])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CHAT_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=CHAT_TOKENS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str):
    """AutoTokenizer, insisting on a fast tokenizer (prepare runs the Rust tokenizer directly)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as exc:
        raise DataError(
            f"{name_or_path}: cannot load a tokenizer ({exc}); pass a folder made by "
            "data_tools/train_tokenizer.py or any transformers tokenizer folder/hub name"
        ) from exc
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{name_or_path}: only a slow tokenizer is available; save it with tokenizer.json (fast)")
    if tok.eos_token_id is None:
        raise DataError(f"{name_or_path}: the tokenizer defines no eos_token; set eos_token in tokenizer_config.json")
    return tok


def pad_id(tok) -> int:
    """The id rows are padded with: the pad token, or EOS for tokenizers without one."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def special_pattern(tok) -> re.Pattern:
    """Matches the strings of the tokenizer's special tokens (longest first)."""
    strings = sorted({t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values() if t.special},
                     key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings)) or "(?!)")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what the tokenizer does (model, normaliser, special tokens), not of file bytes.

    Accepts a loaded fast tokenizer, a `tokenizers.Tokenizer`, or a folder / tokenizer.json path.
    """
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        text = (path / "tokenizer.json" if path.is_dir() else path).read_text(encoding="utf-8")
    else:
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        text = backend.to_str()
    spec = json.loads(text)
    for volatile in ("truncation", "padding"):
        spec.pop(volatile, None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
