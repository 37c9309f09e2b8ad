"""Training recipe: every hyper-parameter of a run, from a YAML file plus `--field value` overrides.

One dataclass is the single source of truth: its defaults, the YAML keys of `recipes/*.yaml`,
the command-line flags (`--max-steps` for `max_steps`) and their `--help` text are all derived
from it, so a flag can never exist without a recipe field or the other way round. Precedence:
defaults < recipe YAML < command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

import yaml


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Recipe:
    model: str = _f("doge-tiny", "model preset (doge-tiny, doge-20m, doge-60m, doge-160m, doge-320m)")
    model_overrides: dict = _f(None, "extra DogeConfig keys, e.g. {is_moe: true} (YAML only)", cli=False)
    seq_len: int = _f(2048, "tokens per sample; must be <= the prepared data's seq_len")
    micro_batch_size: int = _f(8, "samples per rank per forward/backward")
    global_batch_tokens: int = _f(524288, "tokens per optimizer step over all ranks; gradient "
                                          "accumulation = global batch / (micro batch * world size)")
    max_steps: int = _f(8000, "total optimizer steps of the run")
    lr: float = _f(8e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.0, "LR at the end of the decay, as a fraction of --lr")
    warmup_steps: int = _f(800, "linear warmup steps")
    decay_steps: int = _f(800, "decay steps (WSD); 0 = no decay")
    decay_start: typing.Optional[int] = _f(None, "step where the decay starts (default: max_steps - decay_steps)")
    decay_shape: str = _f("linear", "decay shape: linear, 1-sqrt or cosine")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = off)")
    precision: str = _f("auto", "bf16, fp32, or auto (bf16 on GPUs that support it; fp32 on CPU, where bf16 measured ~6x slower)")
    seed: int = _f(0, "seed for weights init and the data order")
    log_interval: int = _f(10, "steps between console/metrics.jsonl/W&B lines")
    save_interval: int = _f(1000, "steps between checkpoints (0 = only at the end and on signals)")
    keep_last: int = _f(3, "keep this many newest checkpoints (0 = keep all)")
    eval_interval: int = _f(500, "steps between validation losses (0 = off)")
    eval_samples: int = _f(256, "validation samples per evaluation (capped at the split's size)")
    max_bad_steps: int = _f(5, "stop after this many non-finite losses/grad norms in a row")
    wandb: str = _f("auto", "auto (online with WANDB_API_KEY, else offline), online, offline or off")
    wandb_project: str = _f("doge", "W&B project name")
    init_from: typing.Optional[str] = _f(None, "continue from this checkpoint folder: load weights and "
                                               "optimizer state, start at step 0 with this run's data "
                                               "and schedule; the source is only read")
    resume: str = _f("auto", "auto: resume from OUTPUT/checkpoints/latest if present; never: refuse to "
                             "start when OUTPUT already holds a checkpoint")
    export: bool = _f(True, "write an HF export to OUTPUT/final at the end")


def _parse_value(raw: str, annotation):
    """CLI strings to the field's type (`none` clears an optional field)."""
    optional = typing.get_origin(annotation) is typing.Union
    base = typing.get_args(annotation)[0] if optional else annotation
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if base is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    return base(raw)


def _fields():
    hints = typing.get_type_hints(Recipe)
    return [(f, hints[f.name]) for f in dataclasses.fields(Recipe)]


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name VALUE` flag per recipe field; unset flags stay None (= keep the recipe's)."""
    group = parser.add_argument_group("recipe fields (override the --recipe YAML)")
    for f, annotation in _fields():
        if f.metadata.get("cli", True):
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="V",
                               type=lambda raw, a=annotation: _parse_value(raw, a),
                               help=f"{f.metadata['help']} (default {f.default})")


def load_recipe(path: str | None, overrides: dict) -> Recipe:
    """Defaults, then the YAML file at `path`, then the non-None `overrides` (from the CLI)."""
    values = {}
    if path:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
        known = {f.name for f, _ in _fields()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe key(s) {unknown}; valid keys: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    recipe = Recipe(**values)
    if recipe.model_overrides is None:
        recipe.model_overrides = {}
    return recipe
