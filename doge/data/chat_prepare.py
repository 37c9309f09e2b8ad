"""Chat and preference records -> a chat DATADIR (the engine behind data_tools/prepare_chat.py).

Records: SFT conversations (`messages`, or two --fields as a user/assistant pair) and DPO pairs
(ultrafeedback_binarized, prompt/chosen/rejected strings, HH-RLHF transcripts); chat.py holds the
format they are written in.

Rendering: each message list is rendered with the tokenizer's chat template; every step of the
rendering (a turn, an assistant header from `add_generation_prompt`) is tokenized on its own, so
the ids a chat model sees at generation time are the ids it was trained on. The mask is 1 on
exactly the assistant contents and their end-of-turn token (the last special token of the turn:
`<|im_end|>` in ChatML), 0 elsewhere (system/user turns, headers, the newline after the turn).

Bad input follows the pre-training rules: a one-line DataError naming the file, record and fix,
and the options are checked (`check_config`) before any record is read. Records that are fine as
data but cannot train are skipped and counted per source in manifest.json (`SKIPS`), each count
with a few `FILE line N` samples: those the chat template rejects (e.g. a conversation that opens
with the assistant, under a template that insists on user/assistant turns), those holding
special-token strings, those whose assistant turns lie past --seq-len, DPO pairs that do not share
their prompt, and DPO pairs that teach nothing (chosen and rejected answers identical, or either
empty: their DPO gradient is zero).
"""
from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from doge import atomic
from doge.data import shards
from doge.data.chat import FORMAT, KINDS, VERSION, read_chat_manifest
from doge.data.chunk_plan import kind_of, load_hub, open_source_file, parse_json_line, resolve_files
from doge.data.errors import DataError, from_os_error
from doge.data.tokenizer import load_tokenizer, pad_id, special_pattern, tokenizer_fingerprint
from doge.data.tokenizer_copy import file_hashes

#: why a record is skipped (each counted per source in manifest.json, with samples)
SKIPS = ("too_long", "no_assistant", "mismatched", "special_token_strings", "template_rejected", "identical_pair",
         "empty_answer")
COUNTS = ("records", "kept", "truncated") + SKIPS
#: what to do when most of a source's records are skipped for one reason
SKIP_FIXES = {"too_long": "raise --seq-len", "no_assistant": "check --fields (which field is the answer)",
              "mismatched": "check that each pair's chosen and rejected share their prompt",
              "special_token_strings": "clean the contents of special-token strings such as <|im_end|>",
              "template_rejected": "fix those records (e.g. a conversation must open with a user turn) or use a "
                                   "tokenizer whose chat template accepts them",
              "identical_pair": "check the pairs: chosen and rejected answers are the same",
              "empty_answer": "check the pairs: an answer is empty"}
SAMPLES = 3  # `where` of the first few records of each skip reason, per source
MIN_SEQ_LEN = 16  # a chat row holds at least the template's headers and one answer token
MAX_SEQ_LEN = 1 << 20  # rows are padded to --seq-len: beyond this a handful of rows fills memory
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


def check_config(cfg: ChatPrepareConfig) -> Fraction:
    """Every option, before any record is read or folder made; returns --val-fraction as a Fraction."""
    if cfg.kind not in KINDS:
        raise DataError(f"--kind {cfg.kind}: choose one of {', '.join(KINDS)}")
    if not cfg.inputs:
        raise DataError("--input: no source given; pass JSONL/parquet files, folders, globs or hf:NAME")
    if isinstance(cfg.seq_len, bool) or not isinstance(cfg.seq_len, int) or cfg.seq_len < MIN_SEQ_LEN:
        raise DataError(f"--seq-len {cfg.seq_len}: too small for a chat row (template headers plus an answer); "
                        f"pass at least {MIN_SEQ_LEN}, e.g. 2048")
    if cfg.seq_len > MAX_SEQ_LEN:
        raise DataError(f"--seq-len {cfg.seq_len}: every row is padded to it, so this would not fit in memory; "
                        f"pass at most {MAX_SEQ_LEN}, e.g. 2048")
    if cfg.fields and (len(cfg.fields) != 2 or not all(f.strip() for f in cfg.fields)):
        raise DataError(f"--fields {','.join(cfg.fields)}: takes two field names; pass --fields PROMPT,ANSWER "
                        "(e.g. question,answer)")
    if cfg.fields and cfg.kind != "sft":
        raise DataError("--fields is for --kind sft (question/answer records); preference records bring their "
                        "own prompt/chosen/rejected fields: drop --fields")
    try:
        fraction = Fraction(str(cfg.val_fraction))
    except (ValueError, ZeroDivisionError):
        raise DataError(f"--val-fraction {cfg.val_fraction}: not a number; pass a fraction 0 <= f < 1, "
                        "e.g. 0.01 (0: no held-out examples)") from None
    if not 0 <= fraction < 1:
        raise DataError(f"--val-fraction {cfg.val_fraction}: must be 0 <= f < 1 (held-out share; 1 or more would "
                        "leave no training example); pass e.g. 0.01, or 0 for no held-out examples")
    if isinstance(cfg.val_rows, bool) or not isinstance(cfg.val_rows, int) or cfg.val_rows < 0:
        raise DataError(f"--val-rows {cfg.val_rows}: must be a whole number >= 0 (the most held-out examples); "
                        "pass e.g. 1000, or 0 for none")
    return fraction


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
class TemplateRejected(Exception):
    """The chat template refused a record's messages (a skip, counted as `template_rejected`)."""


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
        from jinja2 import TemplateError

        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except (TemplateError, ValueError) as exc:
            # the template's own checks (raise_exception: roles must alternate, ...) and transformers'
            # (no empty conversation: an assistant turn with nothing before it has no header to render)
            raise TemplateRejected(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc

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


def _row(ids: list, mask: list, seq_len: int, pad_id: int) -> tuple | None:
    """(ids, mask, truncated) truncated and padded to seq_len; None when no target token is left."""
    truncated = len(ids) > seq_len
    ids, mask = ids[:seq_len], mask[:seq_len]
    if not any(mask):
        return None
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, mask + [0] * pad, truncated


def _skip(counts: dict, samples: dict, reason: str, where: str, detail: str = "") -> None:
    counts[reason] += 1
    seen = samples.setdefault(reason, [])
    if len(seen) < SAMPLES:
        seen.append(f"{where}: {detail}" if detail else where)


def encode_example(renderer: Renderer, record, where: str, cfg: ChatPrepareConfig, pad_id: int,
                   counts: dict, samples: dict | None = None) -> list | None:
    """One record -> its rows (one for SFT, chosen + rejected for DPO), or None if it is skipped
    (counted in `counts` under its reason, and its `where` kept in `samples` for the first few)."""
    samples = {} if samples is None else samples
    if cfg.kind == "sft":
        messages = conversation(record, where, cfg.fields)
        texts = [messages]
        train = [{i for i, m in enumerate(messages) if m["role"] == "assistant"}]
    else:
        pair = preference(record, where)
        if pair is None:
            return _skip(counts, samples, "mismatched", where)
        prompt, chosen, rejected = pair
        if not chosen.strip() or not rejected.strip():
            return _skip(counts, samples, "empty_answer", where)
        if chosen.strip() == rejected.strip():
            return _skip(counts, samples, "identical_pair", where)
        texts = [prompt + [{"role": "assistant", "content": answer}] for answer in (chosen, rejected)]
        train = [{len(prompt)}] * 2
    if not train[0]:
        return _skip(counts, samples, "no_assistant", where)
    if any(renderer.has_special_strings(m) for m in texts):
        return _skip(counts, samples, "special_token_strings", where)
    try:
        encoded = [renderer.encode(m, t) for m, t in zip(texts, train)]
    except TemplateRejected as exc:
        return _skip(counts, samples, "template_rejected", where, str(exc))
    rows = [_row(ids, mask, cfg.seq_len, pad_id) for ids, mask in encoded]
    if any(r is None for r in rows):
        return _skip(counts, samples, "too_long", where)
    if cfg.kind == "dpo" and rows[0][0] == rows[1][0]:  # the answers differ only past --seq-len
        return _skip(counts, samples, "identical_pair", where, f"identical within --seq-len {cfg.seq_len}")
    counts["truncated"] += any(r[2] for r in rows)
    return [r[:2] for r in rows]


# ----------------------------------------------------------------------------- writing
def print_report(line: str) -> None:
    """Counts to stdout, `warning:` lines to stderr."""
    print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)


def prepare_chat(cfg: ChatPrepareConfig, report=print_report) -> Path:
    """Read, render and write a chat DATADIR (single pass, deterministic: the bytes depend only on
    the inputs, the tokenizer and the options); return it. `report` gets the per-source counts and
    warnings (lines starting `warning:`) once the DATADIR is written."""
    out = Path(cfg.output)
    check_config(cfg)
    for spec in cfg.inputs:  # a missing path or a plain-text file is known before the tokenizer loads
        for path in [] if spec.startswith("hf:") else resolve_files(spec):
            if kind_of(path)[0] not in ("jsonl", "parquet"):
                raise DataError(f"{path}: chat data must be JSON Lines or parquet records, not plain text; "
                                "pass the .jsonl/.parquet files")
    if out.exists():
        _check_replaceable(out, cfg.overwrite)
    tok = load_tokenizer(cfg.tokenizer)
    renderer = Renderer(tok)
    pad = pad_id(tok)
    rows, sources = [], []
    for spec in cfg.inputs:
        counts, samples = dict.fromkeys(COUNTS, 0), {}
        for where, record in read_records(spec):
            counts["records"] += 1
            example = encode_example(renderer, record, where, cfg, pad, counts, samples)
            if example is not None:
                counts["kept"] += 1
                rows.append(example)
        if not counts["kept"]:
            first = next(iter(samples.values()), [""])[0]
            raise DataError(f"{spec}: no usable {cfg.kind} example among {counts['records']} records "
                            f"({summary(counts)}{'; e.g. ' + first if first else ''}); check the file's shape, "
                            "--fields, --seq-len or the tokenizer's chat template")
        sources.append({"spec": spec, **counts, "samples": samples})
    try:
        written = _write(cfg, tok, rows, sources)
    except OSError as exc:
        raise from_os_error(exc, out) from exc
    for line in report_lines(cfg, sources):
        report(line)
    return written


def summary(counts: dict) -> str:
    """`90 records: 85 kept (3 truncated), 4 too_long, 1 special_token_strings` (zero counts left out)."""
    skipped = ", ".join(f"{counts[k]} {k}" for k in SKIPS if counts[k])
    return (f"{counts['records']} records: {counts['kept']} kept ({counts['truncated']} truncated)"
            + (f", skipped {skipped}" if skipped else ""))


def report_lines(cfg: ChatPrepareConfig, sources: list) -> list[str]:
    """The console's account of each source, and a warning where most examples were lost or cut."""
    lines = []
    for source in sources:
        lines.append(f"{source['spec']}: {summary(source)}")
        for reason, where in source["samples"].items():
            lines.append(f"  {reason}: e.g. {where[0]}")
        records, kept = source["records"], source["kept"]
        if kept * 2 < records:
            worst = max(SKIPS, key=lambda k: source[k])
            lines.append(f"warning: {source['spec']}: only {kept} of {records} records kept, most skipped as {worst} "
                         f"(e.g. {source['samples'][worst][0]}): {SKIP_FIXES[worst]}")
        if source["truncated"] * 2 > kept:
            lines.append(f"warning: {source['spec']}: {source['truncated']} of {kept} kept examples were cut at "
                         f"--seq-len {cfg.seq_len} (their later turns carry no loss); raise --seq-len to keep them "
                         "whole")
    return lines


def _write(cfg: ChatPrepareConfig, tok, rows: list, sources: list) -> Path:
    out = Path(cfg.output)
    work = atomic.fresh_staging_dir(out)
    try:
        return _fill(cfg, tok, rows, sources, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # a failed write leaves no staging folder behind
        raise


def _fill(cfg: ChatPrepareConfig, tok, rows: list, sources: list, work: Path) -> Path:
    out = Path(cfg.output)
    tok.save_pretrained(work / "tokenizer")
    held = shards.val_mask(0, len(rows), str(Fraction(str(cfg.val_fraction))), cfg.val_rows)
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
