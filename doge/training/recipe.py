"""Training recipes: every hyper-parameter of a run, from a YAML file plus `--field value` overrides.

Each objective has its recipe class (`Objective.recipe_class`): `Recipe` holds the fields every
objective shares, `PretrainRecipe` adds upcycling, `ChatRecipe` (SFT) the number of epochs (and
takes seq_len from the data, max_steps from the epochs), `DPORecipe` beta (and records the frozen
reference's fingerprint, a `derived` field: no flag, no YAML key); each starts from defaults of its
own (`@defaults`: post-training runs are short, at a small LR). A recipe class is the single
source of truth for its objective: its defaults, the YAML keys of `recipes/*.yaml`, the
command-line flags (`--max-steps` for `max_steps`), their `--help` text and the allowed values
(`choices`, `low`/`high` bounds in each field's metadata) are all derived from it, so a flag can
never exist without a recipe field or a field without its check, and a key of another objective
(`--beta` for pre-training) is unknown. Precedence: defaults
< recipe YAML < command line. `load` checks every field and raises `ConfigError` naming the field
and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from doge.eval_tasks.harness import LOCAL_TASKS, SHOTS
from doge.model.configuration import PRESETS
from doge.training.schedule import DECAY_SHAPES

PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("auto", "online", "offline", "off")
RESUME_MODES = ("auto", "never")
COMPILE_MODES = ("auto", "on", "off")
DOC_POSITIONS = ("continue", "restart")


class ConfigError(ValueError):
    """A run that cannot start. Raised before any process group exists; the message names the
    field or file and the fix, and the command line prints it as one `error: ...` line (exit 2)."""


def _f(default, help: str, *, choices=None, low=None, high=None, cli=True, derived=False):
    """A recipe field: default, help text, and its allowed values (choices, or bounds low <= v <= high).
    `derived`: set by the run itself (recorded in checkpoints), neither a flag nor a YAML key."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "high": high,
                                            "cli": cli and not derived, "derived": derived})


@dataclass
class Recipe:
    """The fields every objective shares, at pre-training's defaults; an objective's own recipe
    class adds its fields and, through `@defaults`, its starting values."""

    model: str = _f("doge-tiny", f"model preset ({', '.join(PRESETS)}), or a folder to start from: an HF export "
                                 "(config.json + model.safetensors; its config and weights, a fresh optimizer, "
                                 "e.g. RUNDIR/final) or a checkpoint folder (the same as --init-from)")
    model_overrides: typing.Optional[dict] = _f(None, "extra DogeConfig keys, e.g. {is_moe: true} (YAML only)",
                                                cli=False)
    seq_len: int = _f(2048, "tokens per sample; prepared rows longer than this are cut into several samples, "
                            "so every token is trained on", low=1)
    micro_batch_size: int = _f(8, "samples per rank per forward/backward", low=1)
    global_batch_tokens: int = _f(524288, "tokens per optimizer step over all ranks; gradient accumulation = "
                                          "global batch / (micro batch * world size)", low=1)
    max_steps: int = _f(8000, "total optimizer steps of the run", low=1)
    lr: float = _f(8e-3, "peak learning rate", low=0.0)
    min_lr_ratio: float = _f(0.0, "LR at the end of the decay, as a fraction of --lr", low=0.0, high=1.0)
    warmup_steps: int = _f(800, "linear warmup steps", low=0)
    decay_steps: int = _f(800, "decay steps (WSD); 0 = no decay", low=0)
    decay_start: typing.Optional[int] = _f(None, "step where the decay starts (default: max_steps - decay_steps)",
                                           low=0)
    decay_shape: str = _f("linear", "decay shape", choices=tuple(DECAY_SHAPES))
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to norms, biases, residual scales)", low=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1", low=0.0, high=0.999999)
    adam_beta2: float = _f(0.95, "AdamW beta2", low=0.0, high=0.999999)
    adam_eps: float = _f(1e-8, "AdamW epsilon", low=1e-30)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = off)", low=0.0)
    precision: str = _f("auto", "bf16, fp32, or auto (bf16 on GPUs that support it; fp32 on CPU, where bf16 "
                                "measured ~6x slower)", choices=PRECISIONS)
    compile: str = _f("auto", "torch.compile each decoder layer and the LM-head loss: auto (on for CUDA GPUs; off "
                              "on CPU, where the step is GEMM-bound and the cold compile costs minutes), on, off",
                      choices=COMPILE_MODES)
    activation_checkpointing: bool = _f(False, "recompute each decoder layer's activations in the backward pass "
                                               "instead of keeping them: far less activation memory for about "
                                               "a third more compute (e.g. doge-320m at seq 2048 on a 40 GB GPU)")
    expert_parallel_size: int = _f(1, "ranks that share each CDMoE layer's expert tables, each holding 1/E of the "
                                      "rows (E divides the world size; ZeRO-1/2 without offload)", low=1)
    aux_loss_weight: float = _f(0.001, "weight of the CDMoE load-balancing loss added to the training loss "
                                       "(CDMoE models only)", low=0.0)
    router_z_loss_weight: float = _f(0.0, "weight of the CDMoE router z-loss (mean over layers, tokens and the "
                                          "two product-key halves of logsumexp(logits)^2) added to the training "
                                          "loss (CDMoE models only; 0 = off)", low=0.0)
    router_fp32: bool = _f(False, "compute CDMoE routing (router logits, top-k, routing softmax) in float32 when "
                                  "the model runs in bf16; saved in the model config, so exports route the same way "
                                  "(CDMoE models only)")
    expert_lr_scale: float = _f(1.0, "LR multiplier of the CDMoE router and expert tables (e.g. 10 for the fresh "
                                     "tables of an upcycled model; CDMoE models only; a resume keeps it)", low=1e-6)
    seed: int = _f(0, "seed for weights init and the data order", low=0)
    log_interval: int = _f(10, "steps between console/metrics.jsonl/W&B lines", low=1)
    save_interval: int = _f(1000, "steps between checkpoints (0 = only at the end and on signals)", low=0)
    keep_last: int = _f(3, "keep this many newest checkpoints (0 = keep all)", low=0)
    eval_interval: int = _f(500, "steps between validation losses (0 = off)", low=0)
    eval_samples: int = _f(256, "validation samples per evaluation (capped at the split's size)", low=1)
    downstream_interval: int = _f(0, "steps between benchmark scores of the weights being trained (lm-eval, as "
                                     "python -m doge.evaluate; also at the last step; 0 = off)", low=0)
    downstream_tasks: str = _f(",".join(LOCAL_TASKS), "lm-eval tasks scored, comma-separated (default: "
                                                      "doge.evaluate's local tasks, their files in $DOGE_EVAL_DATA)")
    downstream_limit: int = _f(100, "items scored per task, the first ones (MMLU: per subject)", low=1)
    downstream_shots: int = _f(SHOTS, "shots per benchmark prompt (--num-fewshot of doge.evaluate)", low=0)
    max_bad_steps: int = _f(5, "stop after this many non-finite losses/grad norms in a row", low=1)
    spike_sigma: float = _f(0.0, "skip the update of a step whose loss is more than this many standard deviations "
                                 "above the mean of the last --spike-window applied steps (0 = off; e.g. 6)", low=0.0)
    spike_window: int = _f(50, "applied steps whose losses give the spike guard's mean and std; no step is judged "
                               "before that many were seen", low=2)
    spike_max_skips: int = _f(5, "stop after this many loss spikes in a row (see --spike-sigma)", low=1)
    wandb: str = _f("auto", "auto (online with WANDB_API_KEY, else offline), online, offline or off",
                    choices=WANDB_MODES)
    wandb_project: str = _f("doge", "W&B project name")
    init_from: typing.Optional[str] = _f(None, "continue from this checkpoint folder: load weights and "
                                               "optimizer state, start at step 0 with this run's data "
                                               "and schedule; the source is only read")
    resume: str = _f("auto", "auto: resume from OUTPUT/checkpoints/latest if present; never: refuse to "
                             "start when OUTPUT already holds a checkpoint", choices=RESUME_MODES)
    export: bool = _f(True, "write an HF export to OUTPUT/final at the end")

    #: what the recipe configures, for messages ("unknown recipe key(s) ... for pre-training")
    label: typing.ClassVar[str] = "training"

    def length_in_epochs(self) -> float | None:
        """The run's length in passes over the training data when given that way (preflight then
        sets max_steps from the data's size); None: max_steps as given."""
        return None

    def upcycle_to(self) -> tuple[int | None, int | None]:
        """(experts, top-k) of the CDMoE model a dense start is turned into; (None, None): none."""
        return None, None

    @classmethod
    def fields(cls) -> list[tuple[dataclasses.Field, object]]:
        """(field, resolved type annotation) of every field, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls)]

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """One `--field-name VALUE` flag per field; a flag not given leaves no attribute (= keep the
        recipe's), so `--epochs none` can clear a field whose default is not None."""
        group = parser.add_argument_group(f"{cls.label} recipe fields (override the --recipe YAML)")
        for f, annotation in cls.fields():
            if f.metadata["cli"]:
                group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS, metavar="V",
                                   type=lambda raw, a=annotation: _parse_value(raw, a), help=_help(f))

    @classmethod
    def load(cls, path: str | None, overrides: dict) -> "Recipe":
        """Defaults, then the YAML file at `path`, then `overrides` (the flags given); checked."""
        values = {**(_read_yaml(path, cls) if path else {}), **overrides}
        checked = {}
        for f, annotation in cls.fields():
            if f.name in values and not f.metadata["derived"]:
                checked[f.name] = _coerce(f.name, values[f.name], annotation)
                _check_range(f, checked[f.name])
        recipe = cls(**checked)
        if recipe.model_overrides is None:
            recipe.model_overrides = {}
        return recipe


def defaults(**values):
    """Class decorator (under `@dataclass`): fields of `Recipe` with other defaults, their help and
    checks unchanged, for an objective whose runs start elsewhere (post-training: short, small LR)."""
    def redefine(cls):
        for name, value in values.items():
            base = Recipe.__dataclass_fields__[name]
            cls.__annotations__[name] = base.type
            setattr(cls, name, field(default=value, metadata=base.metadata))
        return cls
    return redefine


@dataclass
class PretrainRecipe(Recipe):
    """Pre-training (doge/train.py): the shared fields' defaults, upcycling a dense start, and
    document masking of packed rows (chat rows hold one conversation each)."""

    upcycle_experts: typing.Optional[int] = _f(None, "turn the dense start model (--model EXPORT or checkpoint, "
                                                     "--init-from) into CDMoE with this many experts (a perfect "
                                                     "square; published: 1024 for doge-20m, 4096 for 60m, 9216 "
                                                     "for 160m): its MLPs become the shared experts, the routed "
                                                     "output starts at zero, the optimizer starts fresh", low=1)
    upcycle_top_k: typing.Optional[int] = _f(None, "experts per token of the upcycled model (published: 16, 32, "
                                                   "48 for 20m, 60m, 160m); needs --upcycle-experts", low=1)
    doc_mask: bool = _f(False, "a token attends only to earlier tokens of its own document in a packed row "
                               "(documents end at the tokenizer's EOS token)")
    doc_positions: str = _f("continue", "RoPE positions with --doc-mask: continue along the row, or restart at 0 at "
                                        "every document start", choices=DOC_POSITIONS)

    label: typing.ClassVar[str] = "pre-training"

    def upcycle_to(self) -> tuple[int | None, int | None]:
        return self.upcycle_experts, self.upcycle_top_k


@dataclass
@defaults(global_batch_tokens=262144, lr=8e-4, warmup_steps=100, decay_steps=100, save_interval=500, keep_last=2,
          eval_interval=500, eval_samples=512)
class ChatRecipe(Recipe):
    """SFT on chat data (doge/sft.py), defaults of recipes/sft-doge-20m.yaml: two epochs of the
    data's conversations, 0.25M tokens per step, LR 8e-4 with short warmup and decay. The row
    length is the chat data's (rows are padded to the --seq-len they were prepared with), and the
    run's length follows from --epochs and the data's size: neither falls back to pre-training's
    2048 tokens or 8000 steps."""

    seq_len: typing.Optional[int] = _f(None, "tokens per row: the chat data's (default: the --seq-len the data was "
                                             "prepared with; a value given must equal it)", low=1)
    max_steps: typing.Optional[int] = _f(None, "total optimizer steps of the run (default: from --epochs and the "
                                               "data's size; with --epochs none, required)", low=1)
    epochs: typing.Optional[float] = _f(2.0, "passes over the training data (> 0): sets max_steps from the data's "
                                             "size (none: run --max-steps steps)", low=0.0)

    label: typing.ClassVar[str] = "SFT"

    def length_in_epochs(self) -> float | None:
        return self.epochs


@dataclass
@defaults(micro_batch_size=4, global_batch_tokens=131072, lr=8e-5, warmup_steps=10,
          decay_steps=10, weight_decay=0.0, save_interval=200, eval_interval=200, eval_samples=256)
class DPORecipe(ChatRecipe):
    """DPO on preference pairs (doge/dpo.py), defaults of recipes/dpo-doge-20m.yaml: two epochs of
    the data's pairs, 0.125M tokens per step, LR 8e-5, beta 0.1. `reference_sha256` is not a flag:
    preflight records the frozen reference's weights in it, so a resume against other weights is
    refused."""

    beta: float = _f(0.1, "weight of the implicit KL penalty towards the frozen reference model (sigmoid loss)",
                     low=1e-6)
    reference_sha256: typing.Optional[str] = _f(None, "sha256 of the frozen reference's weights (the --model "
                                                      "export's safetensors files)", cli=False,
                                                derived=True)

    label: typing.ClassVar[str] = "DPO"


def _base_type(annotation):
    """`Optional[int]` -> (int, True); `int` -> (int, False)."""
    if typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _parse_value(raw: str, annotation):
    """CLI strings to the field's type (`none` clears an optional field)."""
    base, optional = _base_type(annotation)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if base is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    return base(raw)


def _help(f) -> str:
    meta = f.metadata
    allowed = f"; one of {', '.join(meta['choices'])}" if meta["choices"] else ""
    return f"{meta['help']}{allowed} (default {f.default})"


def flag(name: str) -> str:
    """How a user sets field `name`: `--max-steps` (or `max_steps:` in the recipe YAML)."""
    return f"--{name.replace('_', '-')} (recipe key {name})"


def _coerce(name: str, value, annotation):
    """YAML values to the field's type; `1e-3` (a string in YAML 1.1) is accepted as a number."""
    base, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag(name)} is empty: give it a value or drop the key")
    if base is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool)}.get(base, lambda v: isinstance(v, base))
    if not ok(value):
        raise ConfigError(f"{flag(name)} = {value!r}: expected {base.__name__}")
    return float(value) if base is float else value


def _check_range(f, value) -> None:
    meta, name = f.metadata, f.name
    if value is None:
        return
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{flag(name)} = {value!r} is not allowed: choose one of {', '.join(meta['choices'])}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag(name)} = {value}: must be a finite number")
    if name == "epochs" and value <= 0:
        raise ConfigError(f"{flag(name)} = {value:g}: a run needs a positive number of passes over the data (e.g. "
                          "2, or 0.5 for half the data); to give the length in steps, pass --epochs none --max-steps N")
    low, high = meta["low"], meta["high"]
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{flag(name)} = {value}: must be {bounds}")
    if name == "model" and value not in PRESETS and not Path(value).is_dir():
        raise ConfigError(f"{flag(name)} = {value!r}: neither a preset ({', '.join(PRESETS)}) nor a folder; pass "
                          "a preset name, an HF export folder or a checkpoint folder")
    if name == "lr" and value == 0:
        raise ConfigError(f"{flag(name)} = 0: a run needs a positive peak learning rate")



def _read_yaml(path: str, cls: type[Recipe]) -> dict:
    """The recipe file's keys, each a field of `cls` (a key of another objective's recipe is named)."""
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--recipe {path}: cannot read it ({err}); pass an existing YAML file") from err
    if not isinstance(values, dict):
        raise ConfigError(f"--recipe {path}: expected a mapping of recipe keys, e.g. `lr: 1.0e-3`")
    known = {f.name for f, _ in cls.fields() if not f.metadata["derived"]}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--recipe {path}: unknown recipe key(s) {unknown} for {cls.label}; valid keys: "
                          f"{sorted(known)}")
    return values
