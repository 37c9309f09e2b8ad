"""Chat and preference records -> a chat DATADIR (the engine behind data_tools/prepare_chat.py).

Records: SFT conversations (`messages`, or two --fields as a user/assistant pair) and DPO pairs
(ultrafeedback_binarized, prompt/chosen/rejected strings, HH-RLHF transcripts); chat.py holds the
format they are written in.

Rendering: each message list is rendered with the tokenizer's chat template; every step of the
rendering (a turn, an assistant header from `add_generation_prompt`) is tokenized on its own, so
the ids a chat model sees at generation time are the ids it was trained on. The mask is 1 on
exactly the assistant contents and their end-of-turn token (the last special token of the turn:
`<|im_end|>` in ChatML), 0 elsewhere (system/user turns, headers, the newline after the turn).

Bad input follows the pre-training rules: a one-line DataError naming the file, record and fix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from doge import atomic
from doge.data import shards
from doge.data.chat import FORMAT, KINDS, VERSION, read_chat_manifest
from doge.data.chunk_plan import kind_of, load_hub, open_source_file, parse_json_line, resolve_files
from doge.data.errors import DataError, from_os_error
from doge.data.tokenizer import load_tokenizer, pad_id, special_pattern, tokenizer_fingerprint
from doge.data.tokenizer_copy import file_hashes

COUNTS = ("records", "kept", "truncated", "too_long", "no_assistant", "mismatched", "special_token_strings")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ANSWER = "\n\nAssistant:"


@dataclass
class ChatPrepareConfig:
    inputs: list
    tokenizer: str
    output: Path
    kind: str = "sft"
    seq_len: int = 2048
    fields: tuple = ()  # (prompt, answer) fields turned into a user/assistant pair, e.g. question,answer
    val_fraction: str = "0.01"
    val_rows: int = 1000
    overwrite: bool = False
    command: list = field(default_factory=list)


# ----------------------------------------------------------------------------- reading records
def read_records(spec: str):
    """(where, record) for every JSON Lines / parquet record of a source, or every row of `hf:NAME`."""
    if spec.startswith("hf:"):
        for i, record in enumerate(load_hub(spec)):
            yield f"{spec} row {i + 1}", record
        return
    for path in resolve_files(spec):
        kind, compressed = kind_of(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            for i, record in enumerate(pq.read_table(path).to_pylist()):
                yield f"{path} row {i + 1}", record
        elif kind == "jsonl":
            with open_source_file(path, compressed) as fh:
                for i, line in enumerate(fh):
                    if line.strip():
                        text = line.decode("utf-8", errors="replace")
                        yield f"{path} line {i + 1}", parse_json_line(text, path, f"line {i + 1}")
        else:
            raise DataError(f"{path}: chat data must be JSON Lines or parquet records, not plain text")


def _messages(value, where: str, name: str) -> list:
    ok = isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                         and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise DataError(f"{where}: `{name}` must be a list of {{role, content}} strings; fix the record or pass "
                        "--fields PROMPT,ANSWER for question/answer records")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def conversation(record, where: str, fields: tuple) -> list:
    """An SFT record -> messages: smoltalk/OpenAssistant `messages`, else the two --fields as user/assistant."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _messages(record["messages"], where, "messages")
    if not fields:
        raise DataError(f"{where}: no `messages` field (found {sorted(record)}); pass --fields PROMPT,ANSWER "
                        "for question/answer records")
    missing = [f for f in fields if not isinstance(record.get(f), str)]
    if missing:
        raise DataError(f"{where}: no string field(s) {missing}; check --fields (found {sorted(record)})")
    return [{"role": "user", "content": record[fields[0]]}, {"role": "assistant", "content": record[fields[1]]}]


def hh_transcript(text: str, where: str) -> list:
    """`\\n\\nHuman: ... \\n\\nAssistant: ...` (HH-RLHF) -> messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not an HH-RLHF transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`)")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _hh_pair(chosen: str, rejected: str, where: str) -> tuple | None:
    """The prompt is the shared text before chosen's last `\\n\\nAssistant:`; None if rejected differs there."""
    cut = chosen.rfind(HH_ANSWER)
    if cut < 0:
        raise DataError(f"{where}: not an HH-RLHF transcript (no `\\n\\nAssistant:` turn)")
    if not rejected.startswith(chosen[: cut + len(HH_ANSWER)]):
        return None
    rest = len(chosen[: cut + len(HH_ANSWER)])
    return hh_transcript(chosen[:cut], where), chosen[rest:].strip(), rejected[rest:].strip()


def preference(record, where: str) -> tuple[list, str, str] | None:
    """A preference record -> (prompt messages, chosen answer, rejected answer), or None when the
    two do not share their prompt (counted as `mismatched`). Shapes: ultrafeedback_binarized
    (chosen/rejected message lists), prompt/chosen/rejected strings, and HH-RLHF transcripts."""
    if not isinstance(record, dict) or not {"chosen", "rejected"} <= set(record):
        raise DataError(f"{where}: expected an object with `chosen` and `rejected` (found "
                        f"{sorted(record) if isinstance(record, dict) else type(record).__name__})")
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(record.get("prompt"), str):
            return [{"role": "user", "content": record["prompt"]}], chosen, rejected
        return _hh_pair(chosen, rejected, where)
    chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return None
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


# ----------------------------------------------------------------------------- rendering
class Renderer:
    """Messages -> (ids, mask) with the tokenizer's chat template (see the module docstring)."""

    def __init__(self, tok):
        if not tok.chat_template:
            raise DataError(f"{tok.name_or_path}: the tokenizer has no chat template; train_tokenizer.py writes "
                            "ChatML, or set chat_template in tokenizer_config.json")
        self.tok = tok
        self.special_ids = set(tok.all_special_ids)
        self.special = special_pattern(tok)

    def has_special_strings(self, messages: list) -> bool:
        return any(self.special.search(m["content"]) for m in messages)

    def _render(self, messages: list, generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _ids(self, text: str) -> list:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, messages: list, train_turns) -> tuple[list, list]:
        """ids and mask; the mask covers the assistant turns whose index is in `train_turns`."""
        ids, mask, done = [], [], ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                header = self._render(messages[:i], True)
                ids += self._step(done, header, messages)
                mask += [0] * (len(ids) - len(mask))
                done = header
            text = self._render(messages[: i + 1], False)
            turn = self._step(done, text, messages)
            ids += turn
            mask += self._turn_mask(turn) if i in train_turns else [0] * len(turn)
            done = text
        return ids, mask

    def _step(self, done: str, text: str, messages: list) -> list:
        if not text.startswith(done):
            raise DataError(f"{self.tok.name_or_path}: the chat template does not render {len(messages)} messages "
                            "incrementally (a turn changes earlier text); use a template that appends turns")
        return self._ids(text[len(done):])

    def _turn_mask(self, turn: list) -> list:
        """Everything up to and including the turn's last special token (its end-of-turn token)."""
        ends = [j for j, t in enumerate(turn) if t in self.special_ids]
        stop = ends[-1] + 1 if ends else len(turn)
        return [1] * stop + [0] * (len(turn) - stop)


def _row(ids: list, mask: list, seq_len: int, pad_id: int, counts: dict) -> tuple | None:
    """Truncated and padded to seq_len; None when no target token is left."""
    if len(ids) > seq_len:
        counts["truncated"] += 1
        ids, mask = ids[:seq_len], mask[:seq_len]
    if not any(mask):
        return None
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, mask + [0] * pad


def encode_example(renderer: Renderer, record, where: str, cfg: ChatPrepareConfig, pad_id: int,
                   counts: dict) -> list | None:
    """One record -> its rows (one for SFT, chosen + rejected for DPO), or None if it is skipped."""
    if cfg.kind == "sft":
        messages = conversation(record, where, cfg.fields)
        texts = [messages]
        train = [{i for i, m in enumerate(messages) if m["role"] == "assistant"}]
    else:
        pair = preference(record, where)
        if pair is None:
            counts["mismatched"] += 1
            return None
        prompt, chosen, rejected = pair
        texts = [prompt + [{"role": "assistant", "content": answer}] for answer in (chosen, rejected)]
        train = [{len(prompt)}] * 2
    if not train[0]:
        counts["no_assistant"] += 1
        return None
    if any(renderer.has_special_strings(m) for m in texts):
        counts["special_token_strings"] += 1
        return None
    rows = [_row(*renderer.encode(m, t), cfg.seq_len, pad_id, counts) for m, t in zip(texts, train)]
    if any(r is None for r in rows):
        counts["too_long"] += 1
        return None
    return rows


# ----------------------------------------------------------------------------- writing
def prepare_chat(cfg: ChatPrepareConfig) -> Path:
    """Read, render and write a chat DATADIR (single pass, deterministic: the bytes depend only on
    the inputs, the tokenizer and the options); return it."""
    out = Path(cfg.output)
    if cfg.kind not in KINDS:
        raise DataError(f"--kind {cfg.kind}: choose one of {', '.join(KINDS)}")
    if cfg.seq_len < 2:
        raise DataError(f"--seq-len {cfg.seq_len}: must be at least 2")
    if out.exists():
        _check_replaceable(out, cfg.overwrite)
    tok = load_tokenizer(cfg.tokenizer)
    renderer = Renderer(tok)
    pad = pad_id(tok)
    rows, sources = [], []
    for spec in cfg.inputs:
        counts = dict.fromkeys(COUNTS, 0)
        for where, record in read_records(spec):
            counts["records"] += 1
            example = encode_example(renderer, record, where, cfg, pad, counts)
            if example is not None:
                counts["kept"] += 1
                rows.append(example)
        if not counts["kept"]:
            raise DataError(f"{spec}: no usable {cfg.kind} example among {counts['records']} records ({counts}); "
                            "check the file's shape, --fields or --seq-len")
        sources.append({"spec": spec, **counts})
    try:
        return _write(cfg, tok, rows, sources)
    except OSError as exc:
        raise from_os_error(exc, out) from exc


def _write(cfg: ChatPrepareConfig, tok, rows: list, sources: list) -> Path:
    out = Path(cfg.output)
    work = atomic.fresh_staging_dir(out)
    tok.save_pretrained(work / "tokenizer")
    held = shards.val_mask(0, len(rows), cfg.val_fraction, cfg.val_rows)
    dtype = np.dtype(shards.dtype_for_vocab(len(tok)))
    splits = {}
    for split, chosen in (("train", ~held), ("val", held)):
        picked = [r for r, keep in zip(rows, chosen) if keep]
        ids = np.array([r[0] for ex in picked for r in ex], dtype).reshape(-1, cfg.seq_len)
        mask = np.array([r[1] for ex in picked for r in ex], np.uint8).reshape(-1, cfg.seq_len)
        splits[split] = {"examples": len(picked), "target_tokens": int(mask.sum()),
                         "ids": shards.write_shard(work, shards.shard_name(split, 0), ids, ids.size),
                         "mask": shards.write_shard(work, f"{split}-00000.mask.arrow", mask, mask.size)}
    manifest = {"format": FORMAT, "version": VERSION, "kind": cfg.kind, "seq_len": cfg.seq_len, "dtype": dtype.name,
                "tokenizer": {"fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                              "pad_id": int(pad_id(tok)), "name_or_path": str(cfg.tokenizer),
                              "files": file_hashes(work / "tokenizer")},
                "splits": splits, "sources": sources, "fields": list(cfg.fields),
                "val_fraction": cfg.val_fraction, "val_rows": cfg.val_rows, "command": list(cfg.command)}
    atomic.write_json(work / shards.MANIFEST, manifest)
    return atomic.publish_dir(work, out, replace=True)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """--overwrite replaces only a chat DATADIR this module wrote, holding nothing else."""
    if not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it or choose another --output")
    manifest = read_chat_manifest(out)
    own = {shards.MANIFEST, "tokenizer"} | {s[k]["file"] for s in manifest["splits"].values() for k in ("ids", "mask")}
    foreign = sorted(set(p.name for p in out.iterdir()) - own)
    if foreign:
        raise DataError(f"{out}: holds files prepare_chat.py did not write ({', '.join(foreign[:3])}); --overwrite "
                        "would delete them: move them out or choose another --output")
