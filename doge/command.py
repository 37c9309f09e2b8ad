"""What every `python -m doge.X` command shares to answer bad input in one line: an argparse whose
usage errors are one `error: ...` line (exit 2) like every other refusal, an exception as one
line, and the check that a folder is a complete Hugging Face export of a Doge model (made before
torch or the model loads, so a wrong path costs a fraction of a second, not a model load).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from doge.data.errors import DataError

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
EXPORT_FIX = "give a folder `python -m doge.export` or a training run's final/ wrote"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line (exit 2), as the checks' errors are."""

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr, flush=True)
        sys.exit(2)


def check_export(folder: str, flag: str = "--model") -> dict:
    """config.json of the export FOLDER, after checking it holds config.json, the weights (whole or
    every shard its index names) and a tokenizer; DataError naming what is missing otherwise."""
    path, where = Path(folder), f"{flag} {folder}"
    if not path.exists():
        raise DataError(f"{where}: no such folder; {EXPORT_FIX}")
    if not path.is_dir():
        raise DataError(f"{where}: a file, not an export folder; {EXPORT_FIX}")
    if not (path / "config.json").is_file():
        raise DataError(f"{where}: not an export folder (no config.json); {EXPORT_FIX}")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise DataError(f"{where}: config.json is unreadable ({err}); export the model again") from None
    if not isinstance(config, dict):
        raise DataError(f"{where}: config.json holds no JSON object; export the model again")
    if config.get("model_type", "doge") != "doge":
        raise DataError(f"{where}: config.json has model_type {config['model_type']!r}, not 'doge'; "
                        "these tools run Doge exports")
    indexes = [path / name for name in SHARD_INDEXES if (path / name).is_file()]
    if not any((path / name).is_file() for name in WEIGHTS) and not indexes:
        raise DataError(f"{where}: config.json but no weights ({', '.join(WEIGHTS + SHARD_INDEXES)}); "
                        "the export is incomplete: export the checkpoint again")
    for index in indexes:
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{where}: {index.name} is unreadable ({type(err).__name__}: {err}); "
                            "export the checkpoint again") from None
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise DataError(f"{where}: {index.name} names {len(missing)} missing shard(s) ({', '.join(missing[:3])}); "
                            "copy every shard or export the checkpoint again")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{where}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer the model was "
                        "trained with into the folder (exports carry it)")
    return config


def one_line(err: BaseException) -> str:
    """An exception as `Type: message` on one line."""
    return f"{type(err).__name__}: " + " ".join(str(err).split())


def run_command(work, refusals: tuple[type[BaseException], ...], output_flag: str, output) -> int:
    """A writing command's end: print what `work()` returns, exit 0; a refusal (one of `refusals`,
    whose message names the input and the fix) or an OSError while writing `output` (a full disk:
    nothing is published) is one `error:` line and exit 2."""
    try:
        print(work())
    except refusals as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {output_flag} {output}: {err}; free space or choose another {output_flag}",
              file=sys.stderr)
        return 2
    return 0
