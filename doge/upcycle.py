"""Dense -> CDMoE upcycling: continue training a dense Doge checkpoint as a CDMoE model.

The dense MLP becomes the shared expert unchanged. The new parameters are the router and the two
expert tables; `up_embed` starts at zero, so the routed term sum_k act(down_k . x) w_k up_k is
exactly zero and the upcycled model computes the dense model's logits at step 0. Its gradient is
act(down_k . x) w_k * dL/dout, non-zero from the first step; once `up_embed` has moved, the router
and `down_embed` get gradients too (by the second optimizer step).

    python -m doge.upcycle DENSE_DIR OUT_DIR --num-experts 1024 --top-k 16

DENSE_DIR is a Hugging Face export (config.json + model.safetensors, e.g. RUNDIR/final or a
`python -m doge.export` folder) or a training checkpoint RUNDIR/checkpoints/step-XXXXXXXX, as
the trainer's --model/--init-from take it (its full weights from any ZeRO stage and world size).

Refused with one `error: ...` line and exit 2, before any weights are read: --num-experts that is
not a positive perfect square, --top-k outside 1..num-experts, a DENSE_DIR that is missing, a
file, a RUNDIR, an incomplete checkpoint, neither an export nor a checkpoint, or already CDMoE;
an OUT_DIR that exists.

The trainer does the same in one command (`--upcycle-experts`, `--upcycle-top-k`; recipes
`recipes/upcycle-doge-*.yaml`), then trains the CDMoE model with expert parallelism.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from doge import atomic
from doge.command import OneLineParser, run_command
from doge.model.upcycle import check_experts
from doge.training import checkpoint as ckpt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")
SOURCE_HINT = ("pass a Hugging Face export (config.json + model.safetensors, e.g. RUNDIR/final) or a checkpoint "
               "RUNDIR/checkpoints/step-XXXXXXXX")


class UpcycleError(ValueError):
    """A flag or folder the upcycle cannot use; the message names it and the fix."""


def dense_source(folder: Path) -> tuple[bool, dict]:
    """(whether `folder` is a training checkpoint, the dense model's config as a dict), read
    without loading any weights; UpcycleError naming the folder and the fix otherwise."""
    import json

    if not folder.exists():
        raise UpcycleError(f"DENSE_DIR {folder} does not exist: {SOURCE_HINT}")
    if not folder.is_dir():
        raise UpcycleError(f"DENSE_DIR {folder} is a file, not a folder: {SOURCE_HINT}")
    if (folder / ckpt.MANIFEST_FILE).is_file() or (folder / ckpt.STATE_FILE).is_file():
        reason = ckpt.incomplete_reason(folder)
        if reason:
            raise UpcycleError(f"DENSE_DIR {folder} is not a complete checkpoint ({reason}): restore the file, "
                               "or pass another checkpoint or an export")
        return True, ckpt.TrainerState.read(folder).model_config
    if (folder / "checkpoints").is_dir() or (folder / "final").is_dir():
        final = folder / "final"
        raise UpcycleError(f"DENSE_DIR {folder} is a run folder: pass its export "
                           f"{final if final.is_dir() else 'RUNDIR/final'} or one of its checkpoints "
                           f"{folder / 'checkpoints' / 'step-XXXXXXXX'}")
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise UpcycleError(f"DENSE_DIR {folder} has no {name}, so it is neither an export nor a checkpoint: "
                               f"{SOURCE_HINT}")
    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UpcycleError(f"DENSE_DIR {folder}/config.json is unreadable ({err}): re-export the model") from err
    return False, config


def load_dense(folder: Path, is_checkpoint: bool, config: dict):
    """The dense model (fp32 from a checkpoint, the export's dtype from an export)."""
    from safetensors import SafetensorError

    from doge.model.configuration import DogeConfig
    from doge.model.modeling import DogeForCausalLM
    from doge.training.weights import load_weights

    try:
        if is_checkpoint:
            model = DogeForCausalLM(DogeConfig(**config))
            load_weights(model, folder)
            return model
        return DogeForCausalLM.from_pretrained(folder)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, SafetensorError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UpcycleError(f"DENSE_DIR {folder}: its weights cannot be read ({detail}): restore or re-export "
                           "them") from err


def upcycle_folder(dense_dir: Path, out_dir: Path, num_experts: int, top_k: int) -> str:
    """Check everything, then write the CDMoE model to `out_dir`; returns the summary line."""
    from doge.model.upcycle import upcycle, upcycled_config

    try:
        check_experts(num_experts, top_k)
    except ValueError as err:
        raise UpcycleError(f"--num-experts {num_experts} --top-k {top_k}: {err}") from err
    if out_dir.exists():
        kind = "folder" if out_dir.is_dir() else "file"
        raise UpcycleError(f"OUT_DIR {out_dir} exists (a {kind}): choose a new output folder, nothing is overwritten")
    is_checkpoint, config = dense_source(dense_dir)
    if config.get("is_moe"):
        raise UpcycleError(f"DENSE_DIR {dense_dir} is already a CDMoE model (is_moe is true in its config): "
                           "pass a dense model")
    dense = load_dense(dense_dir, is_checkpoint, config)
    try:
        moe_config = upcycled_config(dense.config, num_experts, top_k)
        moe = upcycle(dense, moe_config)
    except ValueError as err:
        raise UpcycleError(f"DENSE_DIR {dense_dir}: {err}") from err
    tmp = atomic.fresh_staging_dir(out_dir)
    try:
        moe.save_pretrained(tmp)
        if is_checkpoint and (dense_dir / "tokenizer").is_dir():  # a checkpoint keeps its tokenizer there
            shutil.copytree(dense_dir / "tokenizer", tmp, dirs_exist_ok=True)
        for name in () if is_checkpoint else TOKENIZER_FILES:
            if (dense_dir / name).exists():
                shutil.copy2(dense_dir / name, tmp / name)
        atomic.publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return (f"wrote {out_dir}: {num_experts} experts, top-{top_k}, "
            f"{sum(p.numel() for p in moe.parameters()) / 1e6:.1f}M parameters")


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m doge.upcycle", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense_dir", metavar="DENSE_DIR", type=Path,
                        help="dense Doge model: HF export folder or training checkpoint folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where to write the CDMoE model (must not exist)")
    parser.add_argument("--num-experts", type=int, required=True, help="number of experts (a perfect square)")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token (num_experts_per_tok)")
    args = parser.parse_args(argv)
    return run_command(lambda: upcycle_folder(args.dense_dir, args.out_dir, args.num_experts, args.top_k),
                       (UpcycleError,), "OUT_DIR", args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
