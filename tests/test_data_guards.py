"""The data tools on inputs and outputs that used to end in a traceback, a misleading message or a
silent success: each now ends with one `error: ...` line (file or field, and the fix), exit 2,
nothing partial left visible, and a rerun on fixed input works."""
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest_data import PREPARE_OPTIONS, PRETRAIN, SEQ_LEN, cli, python_text, read_manifest, tokenizer_dir

REPO = Path(__file__).resolve().parents[1]
STORIES = (PRETRAIN / "hh_helpful_dialogues.txt").read_bytes()[:40_000]


def prepare_args(inputs, out, *extra) -> list:
    return ["--input", *map(str, inputs), "--tokenizer", str(tokenizer_dir()), "--output", str(out), "--seq-len",
            str(SEQ_LEN), "--val-fraction", PREPARE_OPTIONS["val_fraction"], "--quiet", *extra]


def fails_cleanly(capsys, tool: str, argv: list, message: str) -> str:
    """Run a data tool's main(argv); it must return 2 with one `error:` line matching `message`."""
    assert cli(tool).main(argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, last), last
    return last


def nothing_visible(out: Path) -> None:
    """Neither the output nor its work folder (nor a staging leftover) is there."""
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".tmp-{out.name}")]


@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n   \n", b'{"text": ""}\n{"text": "  \\n "}\n'])
def test_empty_or_whitespace_only_input_is_an_error(tmp_path, capsys, content):
    src = tmp_path / ("empty.jsonl" if content.startswith(b"{") else "empty.txt")
    src.write_bytes(content)
    out = tmp_path / "out"
    fails_cleanly(capsys, "prepare", prepare_args([src], out), rf"{src.name}: no text \(\d+ empty or whitespace-only")
    nothing_visible(out)
    fixed = json.dumps({"text": STORIES.decode()}).encode() if src.suffix == ".jsonl" else STORIES
    src.write_bytes(fixed)  # fixed input: the same command now works
    assert cli("prepare").main(prepare_args([src], out)) == 0 and read_manifest(out)["splits"]["train"]["rows"] > 0


def test_binary_input_is_refused_by_both_tools(tmp_path, capsys):
    src = tmp_path / "model.txt"
    src.write_bytes(bytes(range(256)) * 2 + os.urandom(60_000))
    out = tmp_path / "out"
    fails_cleanly(capsys, "prepare", prepare_args([src], out), r"model\.txt: \d+ of \d+ documents are not valid UTF-8")
    nothing_visible(out)
    fails_cleanly(capsys, "train_tokenizer", ["--input", str(src), "--output", str(tmp_path / "tok"), "--vocab-size",
                                              "400"], r"model\.txt: \d+ of \d+ documents are not valid UTF-8")
    nothing_visible(tmp_path / "tok")


def test_overwrite_never_deletes_what_prepare_did_not_write(tmp_path, capsys):
    out = tmp_path / "web"
    out.mkdir()
    raw = out / "corpus.txt"  # raw input kept in the output folder
    raw.write_bytes(STORIES)
    fails_cleanly(capsys, "prepare", prepare_args([raw], out, "--overwrite"),
                  r"web: exists and is not a DATADIR written by prepare.py .*move its contents away")
    assert raw.read_bytes() == STORIES and os.listdir(out) == ["corpus.txt"]
    elsewhere = tmp_path / "corpus.txt"
    raw.rename(elsewhere)
    out.rmdir()
    assert cli("prepare").main(prepare_args([elsewhere], out)) == 0
    notes = out / "NOTES.md"
    notes.write_text("where this data came from\n")
    fails_cleanly(capsys, "prepare", prepare_args([elsewhere], out, "--overwrite"),
                  r"web: holds files prepare.py did not write \(NOTES\.md\); --overwrite would delete them")
    assert notes.read_text() == "where this data came from\n" and (out / "manifest.json").is_file()
    notes.unlink()
    first = read_manifest(out)
    assert cli("prepare").main(prepare_args([elsewhere], out, "--overwrite", "--seq-len", "128")) == 0
    assert read_manifest(out)["seq_len"] == 128 != first["seq_len"]


def test_truncated_or_mislabelled_gz_input(tmp_path, capsys):
    whole = gzip.compress(STORIES)
    src = tmp_path / "stories.txt.gz"
    out = tmp_path / "out"
    for name, data in (("truncated", whole[: len(whole) // 2]), ("not compressed", STORIES)):
        src.write_bytes(data)
        fails_cleanly(capsys, "prepare", prepare_args([src], out),
                      r"stories\.txt\.gz: not a complete gzip file .*re-download it")
        nothing_visible(out)
    src.write_bytes(whole)
    assert cli("prepare").main(prepare_args([src], out)) == 0  # the rerun gets past the earlier attempts


def test_truncated_gz_jsonl_fails_while_planning(tmp_path, capsys):
    src = tmp_path / "code.jsonl.gz"
    src.write_bytes(b"\x1f\x8b\x08\x00broken")
    fails_cleanly(capsys, "prepare", prepare_args([src], tmp_path / "out"),
                  r"code\.jsonl\.gz: not a complete gzip file")
    fails_cleanly(capsys, "train_tokenizer", ["--input", str(src), "--output", str(tmp_path / "tok")],
                  r"code\.jsonl\.gz: not a complete gzip file")


def test_full_disk_names_the_error_and_a_rerun_continues(tmp_path, capsys):
    """Writes that hit ENOSPC: the progress file's staging name is pointed at /dev/full, whose
    every write fails with the kernel's 'No space left on device'."""
    src = tmp_path / "stories.txt"
    src.write_bytes(STORIES)
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / ".tmp-progress.json").symlink_to("/dev/full")
    fails_cleanly(capsys, "prepare", prepare_args([src], out),
                  r"out\.partial: No space left on device; free space, then rerun the same command")
    assert not out.exists()
    (partial / ".tmp-progress.json").unlink()  # space freed
    assert cli("prepare").main(prepare_args([src], out)) == 0 and not partial.exists()


def test_read_only_output_location(capsys):
    """sysfs refuses new folders to everyone, root included."""
    fails_cleanly(capsys, "prepare", prepare_args([PRETRAIN / "tinyshakespeare.txt"], Path("/sys/doge-out/data")),
                  r"/sys/doge-out: (Operation not permitted|Permission denied); "
                  "choose an --output in a writable location")
    fails_cleanly(capsys, "train_tokenizer", ["--input", str(PRETRAIN / "tinyshakespeare.txt"), "--output",
                                              "/sys/doge-out/tok"],
                  r"/sys/doge-out: (Operation not permitted|Permission denied); choose an --output")
    assert not Path("/sys/doge-out").exists()


def test_a_second_prepare_on_the_same_output_stops_at_once(tmp_path, capsys):
    out, inputs = tmp_path / "all", [PRETRAIN, *python_text()]  # ~5 MB: the first is still at work
    first = subprocess.Popen([sys.executable, str(REPO / "data_tools" / "prepare.py"),
                              *prepare_args(inputs, out, "--workers", "1")], stderr=subprocess.PIPE)
    progress = tmp_path / "all.partial" / "progress.json"
    deadline = time.time() + 120
    while not progress.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read().decode()[-2000:]
    start = time.perf_counter()
    fails_cleanly(capsys, "prepare", prepare_args(inputs, out, "--workers", "1"),
                  r"all\.partial: another prepare\.py is writing this output now; wait for it to finish")
    assert time.perf_counter() - start < 10
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
    assert read_manifest(out)["splits"]["train"]["rows"] > 0


@pytest.mark.parametrize("vocab", [0, 5, 262])
def test_vocab_size_below_the_fixed_pieces(tmp_path, capsys, vocab):
    fails_cleanly(capsys, "train_tokenizer", ["--input", str(PRETRAIN / "tinyshakespeare.txt"), "--output",
                                              str(tmp_path / "tok"), "--vocab-size", str(vocab)],
                  rf"--vocab-size {vocab}: must be at least 263 \(256 byte pieces, 4 special and 2 chat tokens, "
                  r"plus one per distinct character\)")


def test_vocab_size_too_small_for_the_characters_or_too_large_for_the_text(tmp_path, capsys):
    src = PRETRAIN / "tinyshakespeare.txt"
    message = fails_cleanly(capsys, "train_tokenizer", ["--input", str(src), "--output", str(tmp_path / "a"),
                                                        "--vocab-size", "300"],
                            r"--vocab-size 300 is too small for the \d+ distinct characters of the text; pass "
                            r"--vocab-size \d+ or more")
    assert "smaller" not in message
    enough = int(message.split("--vocab-size ")[-1].split()[0])
    assert cli("train_tokenizer").main(["--input", str(src), "--output", str(tmp_path / "b"), "--vocab-size",
                                        str(enough)]) == 0
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words of text\n\nand a few more\n")
    fails_cleanly(capsys, "train_tokenizer", ["--input", str(tiny), "--output", str(tmp_path / "c"), "--vocab-size",
                                              "2000"],
                  r"--vocab-size 2000 is more than this text supports \(\d+\); "
                  "pass a smaller --vocab-size or more text")


def test_a_bad_jsonl_line_is_reported_as_itself_by_train_tokenizer(tmp_path, capsys):
    src = tmp_path / "code.jsonl"
    lines = (PRETRAIN / "python_edu_thealgorithms.jsonl").read_text().splitlines()[:30]
    src.write_text("\n".join(lines[:20] + ["{not json"] + lines[20:]) + "\n")
    message = fails_cleanly(capsys, "train_tokenizer", ["--input", str(src), "--output", str(tmp_path / "tok"),
                                                        "--vocab-size", "500"],
                            r"code\.jsonl: line 21: invalid JSON .*; fix or remove that line$")
    assert "sentencepiece" not in message and "vocab-size" not in message
    nothing_visible(tmp_path / "tok")
