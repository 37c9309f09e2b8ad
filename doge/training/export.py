"""A training checkpoint as a Hugging Face folder: what a finished run leaves in RUNDIR/final and
what `python -m doge.export` writes.

The weights are put back together from any ZeRO stage and world size (CDMoE expert tables whole),
saved as fp32 safetensors with config.json and the checkpoint's tokenizer, loadable by stock
`transformers`. The folder is written beside its target and renamed into place, so an interrupted
export never leaves a half-written one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from doge import atomic
from doge.model.configuration import DogeConfig
from doge.model.modeling import DogeForCausalLM
from doge.training.checkpoint import STATE_FILE, TrainerState
from doge.training.weights import checkpoint_weights, load_checked


def export(ckpt: Path, outdir: Path, replace: bool = False) -> Path:
    ckpt, outdir = Path(ckpt), Path(outdir)
    if not (ckpt / STATE_FILE).is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {STATE_FILE}); "
                                "pass a RUNDIR/checkpoints/step-XXXXXXXX folder")
    if outdir.exists() and any(outdir.iterdir()) and not replace:
        raise FileExistsError(f"{outdir} exists and is not empty; choose another OUTDIR")
    model = DogeForCausalLM(DogeConfig(**TrainerState.read(ckpt).model_config))
    load_checked(model, checkpoint_weights(ckpt), ckpt)
    tmp = atomic.fresh_staging_dir(outdir)
    model.save_pretrained(tmp)
    if (ckpt / "tokenizer").is_dir():
        shutil.copytree(ckpt / "tokenizer", tmp, dirs_exist_ok=True)
    return atomic.publish_dir(tmp, outdir, replace=True)
